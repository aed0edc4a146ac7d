"""``python -m g4v_jax.train --config CONFIG [key=value ...]``: one training run (``g4v_jax.train.run.main``)."""

from g4v_jax.train.run import main

if __name__ == "__main__":
    main()
