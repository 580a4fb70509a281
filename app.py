"""Hugging Face Spaces entry point (`app_file: app.py`): the app on the backend the environment names.

Models come from WWT_MODELS (default gpt2); the first one is downloaded and loaded before
the page starts, with the download's progress in the Space's log.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.app_config import AppConfig  # noqa: E402
from app.server import HINT, app_kwargs, build_app, prepare_backend, setup_logging  # noqa: E402
from app.web.ui import launch_kwargs  # noqa: E402
from model import settings  # noqa: E402
from model.errors import OPERATOR, WWTError  # noqa: E402

setup_logging()
try:
    config = AppConfig.from_settings()
    backend = prepare_backend(config)
except (WWTError, settings.SettingError) as e:
    sys.exit(f"error: {e.text_for(OPERATOR) if isinstance(e, WWTError) else e}\n{HINT}")

demo = build_app(backend, config)

if __name__ == "__main__":
    demo.launch(footer_links=["api"], app_kwargs=app_kwargs(backend, config), **launch_kwargs(config.session_capacity, config.mcp))
