"""``sdcore serve``: an HTTP server speaking AUTOMATIC1111's /sdapi/v1 API, with a web page at /.

    schemas   A1111's request bodies (field names, types, defaults)
    requests  a request checked and turned into a Plan (422s naming each refused field)
    samplers  A1111's sampler and scheduler names -> sdcore's schedulers
    options   the A1111 options sdcore has
    files     models and LoRAs by name, only inside --models-dir / --lora-dir
    queue     the bounded FIFO and the one worker thread per device
    runner    the loaded model and running a Plan on it
    app       the FastAPI application; server: running it under uvicorn

FastAPI and uvicorn are the ``serve`` extra: ``pip install 'sdcore[serve]'``."""
