"""README command 1 runs: the demo writes a real mp4, decodes it and runs the jitted forward pass."""

from g4v_jax import demo


def test_demo_runs_on_a_written_video(tmp_path, capsys):
    result = demo.run("tiny", out=str(tmp_path), batch=2, repeats=1)
    out = capsys.readouterr().out
    assert (tmp_path / "synthetic.mp4").is_file()
    assert result["features"] == (2, 4, 17, 32)
    assert result["tokens"] == (2, 9, 64)
    assert result["logits"] == (2, 512)  # the whole GPT4Video: video spliced into the prompt, next-token logits
    assert "video tokens" in out and "jitted forward" in out and "next-token logits" in out


def test_demo_paper_variant_on_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from g4v_jax.data.video import synthetic_frames

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(synthetic_frames(3, 64, 80)):  # 3 images for T=4: the last is padded and masked
        Image.fromarray(frame).save(folder / f"f{i}.png")
    result = demo.run("tiny", video=str(folder), out=str(tmp_path), batch=1, repeats=1,
                      overrides=["model.abstractor.variant=paper"])
    assert result["tokens"] == (1, 8, 64)
    assert np.isfinite(result["step_ms"])
