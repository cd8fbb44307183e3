"""The Anatomy-VLM MONAI Label app's adapters (configs, infers, trainers, activelearning).

Imported as the top-level package ``lib`` (MONAI Label puts the app directory on ``sys.path``),
as in MONAI Label's sample apps.
"""
