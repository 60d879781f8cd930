"""``pmf serve``: a web page and an HTTP API that retarget with one model, loaded and compiled once.

* :mod:`pmf_jax.serve.model`: the model (:class:`~pmf_jax.serve.model.ServedModel`): the pipeline ``pmf retarget``
  builds, its defaults, the warm-up that compiles, one generation per request;
* :mod:`pmf_jax.serve.request_form`: a request's fields -> a checked request (or one 400 message);
* :mod:`pmf_jax.serve.job_queue`: one generation at a time, a bounded wait, progress per job;
* :mod:`pmf_jax.serve.app`: the FastAPI routes; ``static/``: the page (plain HTML, CSS and JavaScript modules, no
  build step): ``app.js`` (form, API calls, progress, gallery), ``editor.js`` (the joint editor), ``doodle.js``
  (the stick-figure canvas).

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'pmf_jax[serve]'``); nothing here is imported by
the rest of pmf_jax.
"""
