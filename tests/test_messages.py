"""What a user sees is true and clear: the files a command says it wrote exist, ``describe``
shows what the model did, bad input gets one line naming the file and what is expected,
every command follows one exit-code convention, and the defaults fit the machine.

Commands run through :func:`vlprune.cli.main` (the ``vlprune`` entry point), on timm's tiny
``test_vit`` and generated images; stdout, stderr and the exit status are what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vlprune
from vlprune.cli import main

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

torch.set_num_threads(1)  # tiny ops: a second thread only waits on a busy machine

CLASSES = 2
SIZE = 64  # test_vit at 64 px: 16 patches + the class token


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """An ImageFolder tree (2 classes x 2 images), weights for it and one good image."""
    root = tmp_path_factory.mktemp("messages")
    gen = torch.Generator().manual_seed(0)
    for c in range(CLASSES):
        folder = root / "tree" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j in range(2):
            pixels = torch.randint(0, 256, (48, 56, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"img_{j}.png")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=CLASSES, img_size=SIZE)
    weights = root / "test_vit.pth"
    torch.save(model.state_dict(), weights)
    image = root / "tree" / "n00000000" / "img_0.png"
    return {"tree": root / "tree", "weights": weights, "image": image, "root": root}


def _eval_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval", "imagenet", "--model", "test_vit", "--num-classes", str(CLASSES),
            "--img-size", str(SIZE), "--weights", str(data["weights"]), "--data",
            str(data["tree"]), "-b", "4", "--threads", "1", "--no-progress", "--no-memory",
            "--output", str(out), *extra]


# ---- data-loading workers -------------------------------------------------------------------


def test_workers_default_is_at_most_the_cpus(data, tmp_path, monkeypatch):
    """On 2 CPUs the default is 2 loader processes, not 4 (PyTorch warns above the CPUs)."""
    import vlprune.eval.image_data as image_data

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    seen = []
    real = image_data.DataLoader

    def spy(*args, num_workers=0, **kwargs):
        seen.append(num_workers)
        return real(*args, num_workers=0, **kwargs)  # the count is what matters, not the forks

    monkeypatch.setattr(image_data, "DataLoader", spy)
    assert main(_eval_args(data, tmp_path / "w", "--merge-r", "2", "--no-plot")) == 0
    assert seen and set(seen) == {2}, seen
    from vlprune.cli import make_parser

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    args = make_parser().parse_args(["eval", "imagenet", "--model", "test_vit"])
    assert args.workers == 4


# ---- "wrote" lines name only files that exist -----------------------------------------------


def _wrote(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.startswith("wrote ")]
    assert len(lines) == 1, err
    return lines[0][len("wrote "):].split(", ")


def test_eval_without_matplotlib_does_not_claim_the_plot(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "noplot"
    with pytest.warns(UserWarning, match="no plot written"):
        assert main(_eval_args(data, out, "--merge-r", "2", "-j", "0")) == 0
    files = _wrote(capsys.readouterr().err)
    assert files == [f"{out}.csv", f"{out}.json"]
    assert all(Path(f).is_file() for f in files) and not Path(f"{out}.png").exists()


def test_sweep_result_names_written_files_only(tmp_path, capsys):
    """A plot that failed after an earlier one succeeded is stale: not named either."""
    from vlprune.cli.args import print_sweep_result
    from vlprune.eval.sweep import Sweep, output_paths

    paths = output_paths(tmp_path / "s")
    sweep = Sweep(paths)
    sweep.run([], lambda s: {"top1": 1.0})
    paths.plot.write_bytes(b"stale")  # from an earlier run; this sweep drew no plot
    print_sweep_result(sweep, [("setting", "setting", "")], paths, {}, (),
                       also=[tmp_path / "preds", tmp_path / "s.csv"])
    err = capsys.readouterr().err
    assert _wrote(err) == [str(paths.csv), str(paths.json), str(tmp_path / "s.csv")]
    (tmp_path / "preds").mkdir()
    print_sweep_result(sweep, [("setting", "setting", "")], paths, {}, (),
                       also=[tmp_path / "preds"])
    assert _wrote(capsys.readouterr().err)[-1] == f"{tmp_path / 'preds'}{os.sep}"


# ---- unsupported models ---------------------------------------------------------------------


def test_unsupported_model_lists_one_family_per_line():
    with pytest.raises(vlprune.UnsupportedModelError) as info:
        vlprune.patch(torch.nn.Linear(3, 3), merge_r=2)
    head, *lines = str(info.value).splitlines()
    assert "torch.nn.modules.linear.Linear" in head and head.endswith(":")
    assert len(lines) >= 9 and all(line.startswith("  ") for line in lines)
    pairs = [line.strip().split(": ", 1) for line in lines]
    names = [name for name, _ in pairs]
    assert {"timm_vit", "open_clip", "hf_clip", "hf_bert", "hf_llava"} <= set(names)
    # every registered family, each once, with its full text
    every = vlprune.supported_text()
    assert all(f"{name} ({text})" in every for name, text in pairs) and len(set(names)) == len(names)
    assert len(every) == len("; ".join(f"{name} ({text})" for name, text in pairs))


# ---- describe -------------------------------------------------------------------------------


def test_describe_command_shows_what_each_layer_merged(tmp_path, capsys):
    """test_vit at 160 px: 101 tokens; r=16 merges 16 five times, then only 10 of 21 - 1."""
    out = tmp_path / "d.json"
    assert main(["describe", "--model", "test_vit", "--merge-r", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    head, columns, *rows = text.strip().splitlines()
    assert head.endswith("settings: merge_r=16"), head  # only what differs from the defaults
    assert "prune_keep" not in head and "None" not in head
    assert "merged" in columns and "merge r" not in columns
    cells = [row.split() for row in rows[:6]]
    assert [c[0] for c in cells] == ["0", "1", "2", "3", "4", "5"]
    assert [c[3] for c in cells[:5]] == ["16"] * 5 and cells[5][3:6] == ["10", "of", "16"]
    assert rows[-1].startswith("GFLOPs") and "per sample (batch 1)" in rows[-1]
    saved = json.loads(out.read_text())
    assert saved["merged"] == [16, 16, 16, 16, 16, 10] and saved["batch_size"] == 1
    assert [layer["merge_r"] for layer in saved["layers"]] == [16] * 6  # the schedule asked
    assert saved["config"]["prune_keep"] is None  # the JSON keeps every setting


def test_describe_merged_with_pruning_and_an_impossible_r():
    model = timm.create_model("test_vit").eval()
    vlprune.patch(model, merge_r=200)
    with pytest.warns(UserWarning, match="asks for more tokens"):
        d = vlprune.describe(model)
    assert d.merged == [lr.tokens_in - lr.tokens_out for lr in d.layers] == [50, 25, 12, 6, 3, 2]
    assert "50 of 200" in str(d) and " 200 " not in str(d).replace("of 200", "")
    vlprune.configure(model, prune_keep=0.7, prune_layers=(1,), merge_r=16)
    d = vlprune.describe(model, batch_size=2)
    # layer 1 prunes 100 unprotected tokens to 70 first (85 -> 60), then merges 16
    assert d.layers[1].tokens_in == 85 and d.merged[1] == 16 and d.layers[1].tokens_out == 44
    # elsewhere at most half of the tokens besides the class token: 28 -> 13, 15 -> 7, 8 -> 3
    assert d.merged == [16, 16, 16, 13, 7, 3]
    assert all(m == min(16, (lr.tokens_in - 1) // 2) for m, lr in zip(d.merged, d.layers) if lr.index != 1)
    assert d.batch_size == 2 and "per forward of batch 2 (" in str(d) and "per sample)" in str(d)
    assert str(d).splitlines()[0].endswith("settings: merge_r=16, prune_keep=0.7, prune_layers=(1,)")


def test_describe_takes_any_mapping_of_inputs():
    """A tokenizer's BatchEncoding is a Mapping (a UserDict), not a dict."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    bert = vlprune.patch(transformers.BertModel(cfg).eval(), merge_r=2)
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    d = vlprune.describe(bert, batch)
    assert d.input_shape == {"input_ids": (2, 9), "attention_mask": (2, 9)}
    assert [lr.tokens_in for lr in d.layers] == [9, 7] and d.merged == [2, 2]
    assert d.batch_size == 2 and d.flops_ratio > 1


# ---- exit statuses --------------------------------------------------------------------------


def test_help_documents_the_exit_statuses():
    proc = subprocess.run([sys.executable, "-m", "vlprune.cli", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0
    epilog = proc.stdout[proc.stdout.index("exit status:"):]
    assert "0  done" in epilog and "1  the run failed" in epilog and "2  bad command line" in epilog


def test_bad_input_exits_2_from_the_real_command(tmp_path):
    """``raise SystemExit("message")`` exited 1; bad options are 2, as argparse's own."""
    proc = subprocess.run([sys.executable, "-m", "vlprune.cli", "describe", "--model", "test_vit",
                           "--merge-r", "1,2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("vlprune describe: error: describe takes one --merge-r, "
                                   "--prune-keep and/or --visual-keep value")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "test_vit", "--text-tokens", "3"], "need a llava: model"),
    (["bench", "--model", "test_vit", "--prune-fuse"], "without --prune-keep"),
    (["describe", "--model", "no_such_model_xyz"], "unknown timm model 'no_such_model_xyz'"),
    (["check", "--model", "no_such_model_xyz"], "unknown timm model 'no_such_model_xyz'"),
    (["eval", "imagenet", "--model", "test_vit"], "give --data DIR"),
    (["eval", "imagenet", "--model", "test_vit", "--data", "{tree}", "--merge-r", "2",
      "--setting", "merge_r=2"], "asked for twice"),
    (["eval", "vqa", "--data", "{missing}"], "not found"),
    (["eval", "vqa", "--data", "{missing}", "-b", "0"], "--batch-size must be >= 1"),
    (["viz", "{missing}", "--model", "test_vit", "--merge-r", "2"], "image not found"),
])
def test_every_command_exits_2_with_one_line_for_bad_input(data, tmp_path, capsys, argv,
                                                           message):
    argv = [a.format(tree=data["tree"], missing=tmp_path / "missing.jsonl") for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    prog = " ".join(["vlprune", *argv[:2]]) if argv[0] == "eval" else f"vlprune {argv[0]}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and message in lines[0]
    assert "Traceback" not in captured.err


def test_a_run_that_cannot_finish_exits_1(data, tmp_path, capsys):
    """A dataset out of reach (no hub here) is not bad input: one line, status 1."""
    argv = ["eval", "imagenet", "--model", "test_vit", "--dataset", "hfds/no-such-set"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlprune eval imagenet: error: could not open the timm dataset")


# ---- bad files: one line naming the file and what is expected -------------------------------


def _bad_files(folder: Path) -> dict[str, Path]:
    np = pytest.importorskip("numpy")
    import argparse

    files = {}
    files["text.pth"] = folder / "text.pth"
    files["text.pth"].write_text("these are not weights\n")
    noise = bytes((i * 37 + 11) % 256 for i in range(300))
    files["random.safetensors"] = folder / "random.safetensors"
    files["random.safetensors"].write_bytes(noise)
    files["objects.npz"] = folder / "objects.npz"
    np.savez(files["objects.npz"], a=np.array([{"w": 1}], dtype=object))
    files["random.npz"] = folder / "random.npz"
    files["random.npz"].write_bytes(noise)
    files["namespace.pth"] = folder / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1), "model": {"w": torch.ones(1)}},
               files["namespace.pth"])
    return files


BAD_FILES = {
    "text.pth": "not a torch checkpoint",
    "random.safetensors": "SafetensorError",
    "objects.npz": "object arrays",
    "random.npz": "not an .npz archive",
    "namespace.pth": "argparse.Namespace",
}


@pytest.mark.parametrize("command", ["eval imagenet", "viz"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_weights_get_one_line(data, tmp_path, capsys, command, name):
    path = _bad_files(tmp_path)[name]
    if command == "viz":
        argv = ["viz", str(data["image"]), "--model", "test_vit", "--weights", str(path),
                "--merge-r", "2", "--out", str(tmp_path / "v.png")]
    else:
        argv = _eval_args(data, tmp_path / "e", "--merge-r", "2", "-j", "0")
        argv[argv.index("--weights") + 1] = str(path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlprune {command}: error: cannot read {path}: "), lines[0]
    assert BAD_FILES[name] in lines[0] and "; expected " in lines[0]
    for noise in ("Traceback", "file an issue", "allow_pickle", "weights_only` set to `False"):
        assert noise not in err


def test_read_state_dict_raises_checkpoint_errors(tmp_path):
    from vlprune.eval.weights import CheckpointError, read_state_dict

    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError, match=BAD_FILES[name]) as info:
            read_state_dict(path)
        assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_corrupt_image_given_to_viz(data, tmp_path, capsys):
    good = data["image"].read_bytes()
    for name, content in (("truncated.png", good[: len(good) // 2]), ("noise.jpg", b"\xff" * 99)):
        bad = tmp_path / name
        bad.write_bytes(content)
        out = tmp_path / "viz.png"
        assert main(["viz", str(bad), "--model", "test_vit", "--merge-r", "2",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"vlprune viz: error: cannot read {bad} as an image")
        assert "expected an image file" in lines[0] and not out.exists()


def test_patch_and_describe_name_what_they_take():
    for value, shown in ((None, "got None"), ("vit_base_patch16_224", "got str 'vit_base")):
        with pytest.raises(TypeError, match=r"vlprune.patch\(\) takes the model \(a "
                           rf"torch.nn.Module\) first, {shown}"):
            vlprune.patch(value, merge_r=8)
    with pytest.raises(TypeError, match=r"vlprune.describe\(\) takes the model"):
        vlprune.describe(None)


def test_attn_backend_names_the_allowed_values_and_describe_shows_it():
    message = r"attn_backend must be one of \['auto', 'sdpa', 'flex'\], got 'cuda'"
    model = timm.create_model("test_vit").eval()
    with pytest.raises(ValueError, match=message):
        vlprune.patch(model, merge_r=2, attn_backend="cuda")
    vlprune.patch(model, merge_r=2)
    with pytest.raises(ValueError, match=message):
        vlprune.configure(model, attn_backend="cuda")
    assert "attn_backend" not in str(vlprune.describe(model, flops=False)).splitlines()[0]
    vlprune.configure(model, attn_backend="sdpa")
    head = str(vlprune.describe(model, flops=False)).splitlines()[0]
    assert head.endswith("settings: merge_r=2, attn_backend='sdpa'"), head


# ---- merge_r beyond what the input can merge ------------------------------------------------


def _merge_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "asks for more tokens" in str(w.message)]


def test_impossible_merge_r_warns_once_with_the_effective_schedule():
    """test_vit at 160 px: 101 tokens (1 protected); r=200 can merge 50, 25, 12, 6, 3, 2."""
    model = timm.create_model("test_vit").eval()
    x = torch.randn(1, 3, 160, 160)
    vlprune.patch(model, merge_r=200)
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        model(x)
    (message,) = _merge_warnings(caught)
    assert message.startswith("merge_r=200 asks for more tokens than this input has to merge")
    assert "101 tokens enter (1 protected)" in message and "asks for 1200 in all" in message
    effective = "[50, 25, 12, 6, 3, 2]"
    assert f"Merged per layer for this input: {effective} (101 -> 3 tokens)" in message
    assert str(vlprune.describe(model, flops=False).merged) == effective  # describe agrees
    with warnings.catch_warnings(record=True) as again, torch.no_grad():
        warnings.simplefilter("always")
        model(x)
        vlprune.describe(model, flops=False)
    assert not _merge_warnings(again)  # once per patched model

    vlprune.configure(model, merge_r=[0, 60])  # a new schedule: more than one layer can merge
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        model(x)
    (message,) = _merge_warnings(caught)
    assert "merge_r=[0, 60]" in message and "[0, 50, 0, 0, 0, 0] (101 -> 51 tokens)" in message
    vlprune.patch(model, merge_r=[0, 60])  # patched anew: warned anew
    with pytest.warns(UserWarning, match="asks for more tokens"), torch.no_grad():
        model(x)


def test_schedules_the_input_can_hold_do_not_warn():
    """r=16 merges only 10 at the last layer (half of what is left, as ToMe); that is the
    documented cap, shown by describe, not a mistake worth a warning. Hybrids alike, and
    padded text, whose budgets depend on each text's length."""
    model = timm.create_model("test_vit").eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        vlprune.patch(model, merge_r=16)
        model(torch.randn(2, 3, 160, 160))
        assert vlprune.describe(model, flops=False).merged[-1] == 10
        vlprune.patch(model, merge_r=16, prune_keep=0.5, prune_layers=(1,))
        model(torch.randn(2, 3, 160, 160))
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)
        bert = vlprune.patch(transformers.BertModel(cfg).eval(), merge_r=50)
        bert(input_ids=torch.randint(1, 100, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long))
    assert not _merge_warnings(caught)


def test_merge_warning_stays_out_of_compiled_graphs():
    model = vlprune.patch(timm.create_model("test_vit").eval(), merge_r=200)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break raises
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(torch.randn(1, 3, 160, 160))
    assert out.shape == (1, 1000) and not _merge_warnings(caught)


@pytest.mark.parametrize("settings", [
    dict(merge_r=200),
    dict(merge_r=(8, 0.5)),
    dict(merge_r=[7, 5, 3, 7, 1, 9]),
    dict(merge_r=4, prune_keep=0.5, prune_layers=(0, 2)),
    dict(merge_r=6, prune_keep=0.3, prune_layers=(1,), prune_fuse=True),
    dict(merge_r=5, prune_keep=[0.7, 0.01], prune_layers=(2, 4), prune_recycle=True),
    dict(merge_r=3, prune_keep=0.01, prune_layers=(0,), prune_fuse=True),
])
@pytest.mark.parametrize("size", [64, 160])
def test_the_warned_schedule_is_what_describe_shows(settings, size):
    from vlprune.adapters.step import effective_merges

    model = vlprune.patch(timm.create_model("test_vit", img_size=size).eval(), **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = vlprune.describe(model, flops=False)
    ctx = model._vlprune
    merged, left = effective_merges(ctx, 0, d.layers[0].tokens_in, 1)
    assert merged == d.merged and left == d.layers[-1].tokens_out


def test_bench_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    import vlprune.cli.bench as bench_cli

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark must not run")

    monkeypatch.setattr(bench_cli, "run_bench", no_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--model", "test_vit", "--plot", "b.png", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "vlprune bench: error: --plot needs matplotlib: pip install 'vlprune[eval]'"
