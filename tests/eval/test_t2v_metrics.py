"""CLIP text tower + CLIPModel vs HF transformers (fp32, CPU), the CLIPSIM / FD-CLIP / FID metrics, and the
``python -m g4v_jax.eval.t2v`` command end to end on a tiny random CLIPModel, tiny mp4s and a tiny TorchScript net."""

import dataclasses
import hashlib
import json

import av
import jax
import numpy as np
import pytest

from flax import nnx

from g4v_jax.data.video import load_video, synthetic_frames
from g4v_jax.eval import t2v
from g4v_jax.eval.t2v import FD_CLIP, clipsim, fd_clip, frechet_distance, score_videos
from g4v_jax.models.clip_text import eos_positions
from g4v_jax.models.clip_vit import CLIP_MEAN, CLIP_STD
from g4v_jax.t2v import write_videos

torch = pytest.importorskip("torch")

VOCAB, MAXPOS, IMG = 99, 16, 28


def _tiny_clip(tmp_path_factory, eos_token_id):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=MAXPOS, eos_token_id=eos_token_id,
                         bos_token_id=0, pad_token_id=1, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMG, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm affines and logit scale, so that no mix-up hides behind 1s and 0s
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(1.3)
    path = tmp_path_factory.mktemp(f"hf_clip_eos{eos_token_id}")
    model.save_pretrained(path)
    return path, model


EOS = 49  # an EOS id that is not the largest id, so that the two pooling rules pick different positions


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from g4v_jax.convert.hf_clip_text import load_hf_clip

    path, hf = _tiny_clip(tmp_path_factory, EOS)
    return hf, load_hf_clip(path)


def _ids(eos, rng):
    """Right-padded rows (pad id 1), one full length. eos=2 (legacy): EOT is id 98, the row maximum; otherwise EOS is
    ``eos`` and the other tokens are larger, so argmax-pooling would pick a wrong position."""
    ids = rng.integers(50, 98, (4, MAXPOS))
    mask = np.ones_like(ids)
    for row, n in enumerate([5, MAXPOS - 1, 9, 3]):
        ids[row, n] = 98 if eos == 2 else eos
        ids[row, n + 1:] = 1
        mask[row, n + 1:] = 0
    return ids, mask


@nnx.jit
def _ours(model, ids, frames, mask):
    """Everything the parity test compares, in one compiled program."""
    return (model.text_model(ids, mask).pooled, model.text_model(ids).pooled, model.get_text_features(ids, mask),
            model.get_image_features(frames), model(ids, frames, mask))


@pytest.mark.parametrize("eos", [2, EOS], ids=["legacy_eos_argmax", "eos_id"])
def test_parity_with_hf_clip_model(tiny_clip, eos, rng):
    hf, ours = tiny_clip
    # both pooling rules on one model: HF reads the attribute, ours the config
    hf.text_model.eos_token_id = eos
    ours.text_model.cfg = dataclasses.replace(ours.text_model.cfg, eos_token_id=eos)
    ids, mask = _ids(eos, rng)
    frames = rng.integers(0, 256, (3, IMG, IMG, 3), dtype=np.uint8)
    pixels = ((frames / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pixels))
        ref_pooled = hf.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
        ref_text = hf.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        ref_img = hf.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
    with jax.default_matmul_precision("highest"):
        pooled, pooled_nomask, text, img, out = jax.tree.map(np.asarray, _ours(ours, ids, frames, mask))
    d = {"text pooled": np.abs(pooled - ref_pooled.numpy()).max(), "text_embeds": np.abs(text - ref_text).max(),
         "image_embeds": np.abs(img - ref_img).max(),
         "logits_per_text": np.abs(np.asarray(out.logits_per_text) - ref.logits_per_text.numpy()).max()}
    print(f"CLIPModel parity (eos_token_id={eos}): " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert text.shape == (4, 16) and img.shape == (3, 16)
    assert max(d.values()) <= 1e-4
    # without the padding mask the pooled output (right padding, EOS before the pads) is the same
    np.testing.assert_allclose(pooled_nomask, pooled, atol=1e-5)


def test_eos_positions_follow_hf_rule():
    ids = np.array([[0, 5, 7, 3, 3], [0, 9, 3, 1, 1]])
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 2)), [2, 1])  # argmax of ids (first maximum)
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 3)), [3, 2])  # first eos occurrence


def test_clipsim_known_vectors():
    text = np.array([[1.0, 0.0], [0.0, 2.0]])
    frames = np.array([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # cos 1, 0, 1/sqrt2
                       [[0.0, -1.0], [0.0, 5.0], [1.0, 0.0]]])  # cos -1, 1, 0
    np.testing.assert_allclose(clipsim(text, frames), [(1 + 2 ** -0.5) / 3, 0.0], atol=1e-12)
    mask = np.array([[True, True, False], [False, True, True]])
    np.testing.assert_allclose(clipsim(text, frames, mask), [0.5, 0.5], atol=1e-12)


def test_fd_clip(rng):
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    assert FD_CLIP == "FD-CLIP"
    assert abs(fd_clip(a, a)) < 1e-6
    shift = rng.normal(size=8)
    # same covariance, shifted mean: the trace term vanishes, FD = |shift|^2 exactly
    np.testing.assert_allclose(fd_clip(a, a + shift), shift @ shift, rtol=1e-6)
    b = rng.normal(size=(300, 8)) * 2.0 + 1.0
    np.testing.assert_allclose(fd_clip(a, b), fd_clip(b, a), rtol=1e-8)
    # analytic: N(0, I) vs N(m, 4I) in d dims -> |m|^2 + d (1 + 4 - 2*2)
    d, m = 8, np.full(8, 0.5)
    np.testing.assert_allclose(frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)), m @ m + d, rtol=1e-10)


class _FakeTokenizer:
    """Called like an HF CLIP tokenizer: 0 = BOS, EOS = 49, 1 = pad."""

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        ids = np.ones((len(prompts), max_length), np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            toks = [0] + [50 + (ord(c) % 48) for c in p][:max_length - 2] + [EOS]
            ids[i, :len(toks)] = toks
            mask[i, :len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_score_videos(tiny_clip, rng):
    hf, ours = tiny_clip
    hf.text_model.eos_token_id = EOS
    ours.text_model.cfg = dataclasses.replace(ours.text_model.cfg, eos_token_id=EOS)
    tok = _FakeTokenizer()
    prompts = ["a cat", "a dog on a skateboard"]
    videos = [rng.integers(0, 256, (3, IMG, IMG, 3), dtype=np.uint8),
              rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)]  # other size: resized + center-cropped
    got = score_videos(ours, tok, prompts, videos)
    enc = tok(prompts, padding="max_length", max_length=MAXPOS, truncation=True, return_tensors="np")
    from g4v_jax.eval.t2v import _frames_at

    with torch.no_grad():
        t = hf.get_text_features(input_ids=torch.from_numpy(enc["input_ids"]),
                                 attention_mask=torch.from_numpy(enc["attention_mask"]))
        t = getattr(t, "pooler_output", t).numpy()
        want = []
        for i, v in enumerate(videos):
            px = ((_frames_at(v, IMG) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
            f = hf.get_image_features(pixel_values=torch.from_numpy(px))
            f = getattr(f, "pooler_output", f).numpy()
            want.append(clipsim(t[i:i + 1], f[None])[0])
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_text_tower_alone_from_clip_text_model(tiny_clip, tmp_path, rng):
    """transformers 5 saves a CLIPTextModel without the ``text_model.`` prefix; the converter reads both layouts."""
    from safetensors import safe_open

    from g4v_jax.convert.hf_clip_text import load_hf_clip_text

    hf, ours = tiny_clip
    hf.text_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        prefixed = any(k.startswith("text_model.") for k in f.keys())
    cfg, tower = load_hf_clip_text(tmp_path)
    assert cfg.hidden_size == 32 and cfg.max_position_embeddings == MAXPOS
    for name in ("embeddings.token_embedding", "layers.1.self_attn.q_proj.kernel", "final_layer_norm.scale"):
        a = tower
        b = ours.text_model
        for part in name.split("."):
            a, b = (a[int(part)], b[int(part)]) if part.isdigit() else (getattr(a, part), getattr(b, part))
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=f"{name} (prefixed={prefixed})")


def test_mismatch_is_reported_in_checkpoint_names(tiny_clip, tmp_path):
    from safetensors.numpy import load_file, save_file

    from g4v_jax.convert.hf_clip_text import load_hf_clip
    from g4v_jax.weights import CheckpointMismatchError

    hf, _ = tiny_clip
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["text_projection.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): text_projection\.weight"):
        load_hf_clip(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# The command: python -m g4v_jax.eval.t2v
# --------------------------------------------------------------------------------------------------------------------

TOK_EOS = 1  # "<|endoftext|>" in the tiny vocabulary below
PROMPTS = ["a red square moves", "the thing and the dog", "green", "in a bright kitchen"]


def _write_clip_tokenizer(directory):
    """A tiny CLIP BPE vocabulary (specials, letters and their word-final forms) saved next to the model."""
    from transformers import CLIPTokenizer

    src = directory / "tokenizer_src"
    src.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "th", "the</w>"]
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (src / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    # CLIPTokenizer(vocab_file=..., merges_file=...) ignores the files in transformers 5: from_pretrained
    tok = CLIPTokenizer.from_pretrained(src, model_max_length=MAXPOS)
    assert tok.eos_token_id == TOK_EOS and len(tokens) < VOCAB
    tok.save_pretrained(directory)
    return tok


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """(dir of a tiny HF CLIPModel + its tokenizer, the torch model, the tokenizer)."""
    path, hf = _tiny_clip(tmp_path_factory, TOK_EOS)
    return path, hf, _write_clip_tokenizer(path)


class _NvidiaStyle(torch.nn.Module):
    """Called like NVIDIA's inception-2015-12-05.pt: ``net(x, return_features=True)`` gives pool features; without
    the flag it gives other numbers (so a wrong calling convention changes the FID)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(6, 5, 3, stride=2)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img - 128.0) / 128.0
        feats = torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).mean(dim=(2, 3))
        if return_features:
            return feats
        return self.head(feats)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("inception") / "tiny_inception.pt"
    torch.jit.save(torch.jit.script(_NvidiaStyle().eval()), str(path))
    return path


def _videos(seed, frames, h, w):
    return np.stack([synthetic_frames(frames, h, w, seed=seed + i) for i in range(len(PROMPTS))])


@pytest.fixture(scope="module")
def t2v_data(tmp_path_factory):
    """gen.jsonl (with references), gen_noref.jsonl and same.jsonl (reference = the generated video itself)."""
    root = tmp_path_factory.mktemp("t2v_data")
    gen = write_videos(_videos(0, 6, 40, 56), root / "gen", "g")  # 16:9-ish, like generated videos
    real = write_videos(_videos(10, 7, 48, 64), root / "real", "r")  # 4:3, like MSR-VTT
    lines = [{"id": f"v{i}", "prompt": p, "video": f"gen/{g.name}", "reference": str(r)}  # absolute path allowed
             for i, (p, g, r) in enumerate(zip(PROMPTS, gen, real))]
    (root / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "gen_noref.jsonl").write_text(
        "".join(json.dumps({"prompt": x["prompt"], "video": x["video"]}) + "\n\n" for x in lines))
    (root / "same.jsonl").write_text(
        "".join(json.dumps({**x, "reference": x["video"]}) + "\n" for x in lines))
    return root, gen, real


def _decode_all(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _hf_text(hf, tok, prompts):
    enc = tok(prompts, padding="max_length", max_length=MAXPOS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return getattr(t, "pooler_output", t).numpy()


def _hf_image(hf, frames):
    px = ((frames / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        f = hf.get_image_features(pixel_values=torch.from_numpy(px))
    return getattr(f, "pooler_output", f).numpy()


def _torch_inception_features(path, videos):
    """The tiny network's features of every frame, computed here without g4v_jax: centre square, torch bicubic
    antialiased resize to 299, float in [0, 255], ``net(x, return_features=True)``."""
    net = torch.jit.load(str(path)).eval()
    out = []
    for v in videos:
        frames = _decode_all(v)
        s = min(frames.shape[1:3])
        top, left = (frames.shape[1] - s) // 2, (frames.shape[2] - s) // 2
        x = torch.from_numpy(frames[:, top:top + s, left:left + s].copy()).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 255)
        with torch.no_grad():
            out.append(net(x, return_features=True).numpy())
    return np.concatenate(out)


def _fd(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _run(argv):
    t2v.main([str(a) for a in argv])


def test_cli_clipsim_fd_clip_and_fid(clip_dir, t2v_data, inception_file, tmp_path, capsys):
    path, hf, tok = clip_dir
    root, gen, real = t2v_data
    out = tmp_path / "report"
    # batch 5 with 6 (7) frames per video: batches straddle videos and the last one is padded
    _run(["--clip", path, "--data", root / "gen.jsonl", "--out", out, "--inception", inception_file,
          "--batch-frames", 5, "--method", "tiny"])
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    assert rep["clip"] == str(path) and rep["data"] == str(root / "gen.jsonl") and rep["samples"] == 4
    assert rep["data_sha256"] == hashlib.sha256((root / "gen.jsonl").read_bytes()).hexdigest()
    assert rep["frames_per_video"] == "all" and m["generated_frames"] == 24 and m["reference_frames"] == 28
    inc = rep["inception"]
    assert inc["path"] == str(inception_file) and inc["call"] == "net(images, return_features=True)"
    assert inc["sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest() and inc["feature_dim"] == 5
    assert set(rep["metric_definitions"]) == {"clipsim", "clipsim_std", "fd_clip", "fid"}
    assert "NOT FID" in rep["metric_definitions"]["fd_clip"]

    # CLIPSIM and FD-CLIP against HF CLIPModel on frames read by the project's loader (all frames, CLIP geometry)
    gen_frames = [load_video(g, 6, IMG, pad="error").frames for g in gen]
    ref_frames = [load_video(r, 7, IMG, pad="error").frames for r in real]
    text = _hf_text(hf, tok, PROMPTS)
    gen_feats = [_hf_image(hf, f) for f in gen_frames]
    want = [clipsim(text[i:i + 1], gen_feats[i][None])[0] for i in range(4)]
    got = [r["clipsim"] for r in rep["records"]]
    assert [r["id"] for r in rep["records"]] == ["v0", "v1", "v2", "v3"]
    assert [(r["frames"], r["reference_frames"]) for r in rep["records"]] == [(6, 7)] * 4
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(m["clipsim"], np.mean(want), atol=1e-5)
    np.testing.assert_allclose(m["clipsim_std"], np.std(want), atol=1e-5)
    hf_fd = fd_clip(np.concatenate(gen_feats), np.concatenate([_hf_image(hf, f) for f in ref_frames]))
    np.testing.assert_allclose(m["fd_clip"], hf_fd, rtol=1e-3)

    # FID = the Fréchet distance of the network's own features, computed here in torch alone
    want_fid = _fd(_torch_inception_features(inception_file, gen), _torch_inception_features(inception_file, real))
    assert want_fid > 1e-3
    np.testing.assert_allclose(m["fid"], want_fid, rtol=1e-4)

    md = (out / "report.md").read_text()
    row = f"| tiny | 4 | {m['clipsim']:.4f} ± {m['clipsim_std']:.4f} | {m['fd_clip']:.2f} | {m['fid']:.2f} |"
    assert "| Method | N | CLIPSIM | FD-CLIP | FID |" in md and row in md
    assert inc["sha256"] in md and row in capsys.readouterr().out


def test_cli_identical_sets_give_zero(clip_dir, t2v_data, inception_file, tmp_path):
    path, _, _ = clip_dir
    root, _, _ = t2v_data
    _run(["--clip", path, "--data", root / "same.jsonl", "--out", tmp_path, "--inception", inception_file,
          "--batch-frames", 5])
    m = json.loads((tmp_path / "report.json").read_text())["metrics"]
    assert abs(m["fid"]) < 1e-6 and abs(m["fd_clip"]) < 1e-4


def test_cli_sampled_frames_without_references(clip_dir, t2v_data, tmp_path):
    path, hf, tok = clip_dir
    root, gen, _ = t2v_data
    _run(["--clip", path, "--data", root / "gen_noref.jsonl", "--out", tmp_path, "--frames", 2, "--batch-frames", 5])
    rep = json.loads((tmp_path / "report.json").read_text())
    m = rep["metrics"]
    assert rep["frames_per_video"] == 2 and rep["inception"] is None and m["generated_frames"] == 8
    assert m["fd_clip"] is None and m["fid"] is None and m["reference_frames"] is None
    assert set(rep["metric_definitions"]) == {"clipsim", "clipsim_std"}
    assert [r["id"] for r in rep["records"]] == ["1", "3", "5", "7"]  # line numbers (blank lines in between)
    text = _hf_text(hf, tok, PROMPTS)
    want = [clipsim(text[i:i + 1], _hf_image(hf, load_video(g, 2, IMG).frames)[None])[0] for i, g in enumerate(gen)]
    np.testing.assert_allclose([r["clipsim"] for r in rep["records"]], want, atol=1e-5)
    md = (tmp_path / "report.md").read_text()
    assert f"| gen_noref | 4 | {m['clipsim']:.4f} ± {m['clipsim_std']:.4f} | — | — |" in md
    assert "not computed (no reference videos)" in md and "not computed (no --inception network)" in md


def test_read_video_frames_sampling(t2v_data):
    _, gen, _ = t2v_data
    every = t2v.read_video_frames(gen[0])
    assert every.shape == (6, 40, 56, 3) and every.dtype == np.uint8
    np.testing.assert_array_equal(t2v.read_video_frames(gen[0], 3), every[[1, 3, 5]])  # middles of 3 segments
    np.testing.assert_array_equal(t2v.read_video_frames(gen[0], 10), every)  # fewer frames: all, none repeated


def _write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, match", [
    (["{not json\n"], r"d.jsonl:1: not valid JSON"),
    ([[1, 2]], r"d.jsonl:1: expected a JSON object"),
    ([{"prompt": "a", "video": "g/g_1.mp4", "caption": "x"}], r"d.jsonl:1: unknown key\(s\) \['caption'\]"),
    ([{"video": "g/g_1.mp4"}], r"d.jsonl:1: missing \"prompt\""),
    ([{"prompt": " ", "video": "g/g_1.mp4"}], r"d.jsonl:1: \"prompt\" must be a non-empty string"),
    ([{"prompt": "a", "video": ""}], r"d.jsonl:1: \"video\" must be a non-empty path"),
    ([{"prompt": "a", "video": "g/nope.mp4"}], r"d.jsonl:1: video file .*nope.mp4' not found"),
    ([{"prompt": "a", "video": "g/g_1.mp4", "reference": "r/nope.mp4"}], r"d.jsonl:1: reference file .* not found"),
    ([{"id": True, "prompt": "a", "video": "g/g_1.mp4"}], r"d.jsonl:1: \"id\" must be"),
    ([{"id": "x", "prompt": "a", "video": "g/g_1.mp4"}, {"id": "x", "prompt": "b", "video": "g/g_1.mp4"}],
     r"d.jsonl:2: duplicate id 'x' \(first on line 1\)"),
    ([{"prompt": "a", "video": "g/g_1.mp4", "reference": "g/g_1.mp4"}, {"prompt": "b", "video": "g/g_1.mp4"}],
     r"d.jsonl:2: no \"reference\" here but one on .*d.jsonl:1"),
    (["\n"], r"d.jsonl: no videos"),
])
def test_read_t2v_data_errors(tmp_path, rows, match):
    (tmp_path / "g").mkdir()
    write_videos(synthetic_frames(2, 8, 8)[None], tmp_path / "g", "g")
    with pytest.raises(t2v.T2VDataError, match=match):
        t2v.read_t2v_data(_write_jsonl(tmp_path / "d.jsonl", rows))


def test_cli_errors(clip_dir, t2v_data, inception_file, tmp_path):
    path, _, _ = clip_dir
    root, gen, _ = t2v_data
    with pytest.raises(SystemExit, match=r"gen_noref.jsonl: --inception needs a \"reference\" video on every line"):
        _run(["--clip", path, "--data", root / "gen_noref.jsonl", "--out", tmp_path, "--inception", inception_file])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "video": str(gen[0])},
                                              {"prompt": "b", "video": "broken.mp4"}])
    with pytest.raises(SystemExit, match=r"d.jsonl:2: video: .*broken.mp4"):
        _run(["--clip", path, "--data", data, "--out", tmp_path / "o"])
    with pytest.raises(SystemExit, match=r"not a TorchScript archive"):
        torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
        _run(["--clip", path, "--data", root / "gen.jsonl", "--out", tmp_path / "o", "--inception",
              tmp_path / "pickled.pt"])
    with pytest.raises(SystemExit):
        _run(["--clip", path, "--data", root / "gen.jsonl", "--out", tmp_path / "o", "--frames", 0])
    assert not (tmp_path / "o").exists()
