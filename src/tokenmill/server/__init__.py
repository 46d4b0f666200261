"""The OpenAI-compatible HTTP server behind `tokenmill serve`.

``tokenmill.server.app.create_app(engine, ...)`` builds the FastAPI application;
``tokenmill.server.launcher.serve(args)`` loads the engine and runs it under uvicorn.
Nothing is imported here so that ``import tokenmill.server`` stays cheap.
"""
