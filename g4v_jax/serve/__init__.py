"""Serving: ``python -m g4v_jax.serve`` (an OpenAI-compatible video chat API, video generation jobs, metrics and a
web page) over the inference engine. ``app.Server`` + ``app.create_app`` are the library; ``api`` the schema,
``media`` untrusted video input, ``jobs`` the text-to-video jobs."""
