"""A procedurally generated video world for the CPU demo: coloured shapes that move on a plain background.

``scene`` holds the grammar (``Scene``, ``caption``/``parse_caption``) and the NumPy renderer; ``tasks`` turns scenes
into the training manifests, test sets and safety cases of the three training stages (``build_world``); ``backend``
registers the world's text-to-video backend ``"world"``, which renders a caption the LLM writes between video tags.
"""
