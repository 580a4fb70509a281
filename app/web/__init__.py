"""The web UI: the Gradio page (`ui`), what its events do (`callbacks`), the HTML they show
(`render`), and the editor's own HTML, JavaScript and CSS (`static/`)."""
