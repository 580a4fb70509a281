"""Hugging Face Spaces entry point (`app_file: app.py`): the app on the backend the environment names.

Models come from WWT_MODELS (default gpt2); the first one is downloaded and loaded before
the page starts, with the download's progress in the Space's log.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.server import HINT, app_kwargs, build_app, model_specs, prepare_backend, setup_logging  # noqa: E402
from app.web.ui import launch_kwargs  # noqa: E402
from model import settings  # noqa: E402
from model.errors import WWTError  # noqa: E402

setup_logging()
try:
    backend = prepare_backend(settings.get("WWT_BACKEND"), model_specs(None),
                              redis_url=settings.get("WWT_REDIS_URL"), device=settings.get("WWT_DEVICE") or None,
                              dtype=settings.get("WWT_DTYPE") or None)
except (WWTError, settings.SettingError) as e:
    sys.exit(f"error: {getattr(e, 'message', e)}\n{HINT}")

demo = build_app(backend)

if __name__ == "__main__":
    demo.launch(footer_links=["api"], app_kwargs=app_kwargs(backend), **launch_kwargs())
