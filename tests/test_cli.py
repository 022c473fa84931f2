"""The CLI through click's CliRunner (stub models where the zoo is not needed) and as a
subprocess: outputs, --help, and clean exit-2 failures that leave nothing behind."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import cli
from erftool.commands import compare as commands_compare
from erftool.commands import heatmap as commands_heatmap
from erftool.commands import models as commands_models
from erftool.commands.models import Inputs

REPO = Path(__file__).resolve().parent.parent


class TinyNet(nn.Module):
    """Two 3x3 convs and a stride-2 conv: an 8x8 map from a 16x16 input."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.body(self.stem(x))


def _fake_inputs(n, seed, channels):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, 16, 16, generator=g)
    disp = [x[i].permute(1, 2, 0).numpy() for i in range(n)]
    centres = [[(5.0, 5.0), (10.0, 9.0)] for _ in range(n)]
    boxes = [[(3, 3, 8, 8), (7, 6, 14, 13)] for _ in range(n)]
    return Inputs(images=x, display=disp, source="fake data", centres=centres,
                  boxes=boxes, scales=[[5, 7] for _ in range(n)])


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Checkpoint files that load as TinyNets, and fake synthetic data."""
    def load(path, arch, device):
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(2, "No such checkpoint", str(p))
        if p.read_text() == "unknown-arch":
            raise ValueError(f"checkpoint {p}: unknown architecture 'nope'")
        return TinyNet(seed=len(p.stem)).eval()
    for mod in (commands_compare, commands_heatmap):
        monkeypatch.setattr(mod, "load_model", load)
        monkeypatch.setattr(mod, "synthetic_inputs", _fake_inputs)
    ckpts = []
    for name in ("rigid", "dk"):
        p = tmp_path / f"{name}.pt"
        p.write_text("stub")
        ckpts.append(str(p))
    return ckpts


def invoke(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


# ---------------------------------------------------------------- compare

def test_compare_writes_everything(stubbed, tmp_path):
    out = tmp_path / "cmp"
    res = invoke("compare", *stubbed, "--synthetic", "3", "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    for f in ("erf_grid_shared.png", "erf_grid_normalised.png", "erf_profiles.png",
              "metrics.json", "metrics.csv", "report.html", "erf_rigid.npz", "erf_dk.npz",
              "erf_rigid.npy", "erf_dk.npy"):
        assert f in names
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["rigid", "dk"]
    assert rows[0]["images"] == 3 and rows[0]["rule"] == "abs"
    assert np.load(out / "erf_dk.npy").shape == (16, 16)
    assert "rigid" in res.output and "std_y" in res.output  # the table reaches stdout
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmp.partial")]


def test_compare_object_centres_and_position(stubbed, tmp_path):
    res = invoke("compare", *stubbed, "--synthetic", "2", "--object-centres", "--out",
                 str(tmp_path / "a"), "-q", "--format", "svg")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "erf_grid_shared.svg").exists()
    res = invoke("compare", *stubbed, "--synthetic", "2", "--position", "2,3", "--layer",
                 "body.1", "--out", str(tmp_path / "b"), "-q")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert rows[0]["layer"] == "body.1"


def test_compare_image_folder(stubbed, tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((20, 24, 3)) * 255).astype(np.uint8)) \
            .save(folder / f"{i}.png")
    res = invoke("compare", *stubbed, "--images", str(folder), "--out", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())[0]["images"] == 2


def test_compare_replaces_own_files_and_keeps_others(stubbed, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "metrics.json").write_text("old")
    assert invoke("compare", *stubbed, "--synthetic", "1", "--out", str(out), "-q").exit_code == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "metrics.json").read_text() != "old"


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _not_image(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.png").write_text("not a png")
    return d


@pytest.mark.parametrize("case, extra, message", [
    ("missing checkpoint", ["/nonexistent/a.pt"], "No such checkpoint"),
    ("empty image folder", ["--images", "{empty}"], "contains no PNG or JPEG"),
    ("missing image folder", ["--images", "/nonexistent/dir"], "does not exist"),
    ("not an image", ["--images", "{bad}"], "cannot decode image"),
    ("unknown layer", ["--layer", "nope"], "unknown layer"),
    ("position outside", ["--position", "40,1"], "outside"),
    ("bad position text", ["--position", "a,b"], "--position"),
    ("unknown arch", ["{unknown}"], "unknown architecture"),
    ("both inputs", ["--images", "{empty}", "--synthetic", "2"], "either"),
])
def test_compare_bad_input_exit_2_no_output(stubbed, tmp_path, case, extra, message):
    unknown = tmp_path / "u.pt"
    unknown.write_text("unknown-arch")
    fill = {"empty": str(_empty_dir(tmp_path)), "bad": str(_not_image(tmp_path)),
            "unknown": str(unknown)}
    args = [a.format(**fill) for a in extra]
    ckpts = [] if any(a.endswith(".pt") for a in args) else stubbed
    out = tmp_path / "out"
    res = CliRunner().invoke(cli.main, ["compare", *ckpts, *args, "--out", str(out), "-q"])
    assert res.exit_code == 2, (case, res.output)
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists(), case
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cuda_without_gpu_is_exit_2(stubbed, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(cli.main, ["compare", *stubbed, "--device", "cuda", "--out",
                                        str(tmp_path / "o")])
    assert res.exit_code == 2 and "CUDA" in res.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- heatmap

def test_heatmap_image_and_synthetic(stubbed, tmp_path):
    from PIL import Image
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    res = invoke("heatmap", stubbed[0], "--image", str(img), "--out", str(tmp_path / "h"), "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "h.png").exists()
    res = invoke("heatmap", stubbed[1], "--image", "synthetic:4", "--out", str(tmp_path / "s"),
                 "-q", "--format", "pdf")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.pdf").read_bytes().startswith(b"%PDF")


def test_heatmap_bad_image_exit_2(stubbed, tmp_path):
    bad = tmp_path / "b.png"
    bad.write_text("nope")
    for image in (str(bad), str(tmp_path / "missing.png"), "synthetic:x"):
        res = CliRunner().invoke(cli.main, ["heatmap", stubbed[0], "--image", image, "--out",
                                            str(tmp_path / "h")])
        assert res.exit_code == 2, res.output
        assert not (tmp_path / "h.png").exists()


# ---------------------------------------------------------------- others

def test_every_command_has_help_with_example():
    for name, cmd in cli.main.commands.items():
        res = CliRunner().invoke(cli.main, [name, "--help"]) if name != "bench" else None
        text = res.output if res else cmd.help
        assert "Example" in text, name


def test_verify_rows_and_exit_code(monkeypatch):
    from erftool.commands import verify as v
    rows = [{"name": "ones", "formula": "(1+z+z^2)^n", "max_error": 0.0, "tolerance": 1e-12,
             "passed": True}]
    monkeypatch.setattr(v, "_suite", lambda: (lambda **kw: rows))
    monkeypatch.setattr(v, "_check_names", lambda: [])
    res = invoke("verify", "--json")
    assert res.exit_code == 0 and json.loads(res.output)[0]["verdict"] == "PASS"
    rows.append({"name": "bad", "formula": "x", "error": 1.0, "tol": 0.1})
    res = CliRunner().invoke(cli.main, ["verify"])
    assert res.exit_code == 1 and "FAIL" in res.output and "1/2 checks passed" in res.output


def test_verify_real_suite_as_subprocess():
    res = _run("verify", "--quick", "--json")
    rows = json.loads(res.stdout)
    assert res.returncode == (0 if all(r["passed"] for r in rows) else 1)
    assert {"check", "formula", "max_error", "tolerance", "verdict"} <= set(rows[0])


def test_staged_output_leaves_nothing_on_failure(tmp_path):
    from erftool.commands.common import staged_output
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "x") as tmp:
            (tmp / "half.png").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_unique_names_and_bundled_order(tmp_path):
    assert commands_models.unique_names([Path("a/m.pt"), Path("b/m.pt")]) == ["m", "m-2"]
    keys = sorted([Path("dk.pt"), Path("rigid.pt"), Path("dk_dc.pt"), Path("dc.pt")],
                  key=commands_models._paper_key)
    assert [k.stem for k in keys] == ["rigid", "dc", "dk", "dk_dc"]
    keys = sorted([Path(f"resnet-tiny-{op}.pt") for op in
                   ("dk+dc", "dk-global", "dk-local", "dc", "rigid")],
                  key=commands_models._paper_key)
    assert [k.stem[12:] for k in keys] == ["rigid", "dc", "dk-local", "dk-global", "dk+dc"]


def test_recentre_moves_probe_to_centre():
    m = np.zeros((9, 9))
    m[1, 7] = 1
    r = commands_compare.recentre(m, (1, 7))
    assert r[4, 4] == 1 and r.sum() == 1


# ---------------------------------------------------------------- subprocess

def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_subprocess_help_and_missing_checkpoint(tmp_path):
    res = _run("--help")
    assert res.returncode == 0 and "compare" in res.stdout
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.startswith("erftool ")
    res = _run("compare", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "No such checkpoint" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("erftool") is None, reason="console script not installed")
def test_console_script_help():
    res = subprocess.run(["erftool", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "verify" in res.stdout


# ---------------------------------------------------------------- figures

def _fake_bench(tmp_path):
    rows = []
    for shape in ("56x56_c64", "14x14_c256"):
        rows.append({"shape": shape, "op": "conv3x3", "backend": "onednn", "fwd_ms": 1.0,
                     "fwdbwd_ms": 3.0})
        rows.append({"shape": shape, "op": "dk_s4", "backend": "native", "fwd_ms": 2.0,
                     "fwdbwd_ms": 7.0, "paired_ratio_fwd": 1.5})
        rows.append({"shape": shape, "op": "dk_s4", "backend": "reference", "fwd_ms": 90.0})
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps({"meta": {"cpu": "test cpu", "threads": 2}, "rows": rows}))
    return p


def test_speed_panels_reads_both_benchmark_layouts(tmp_path):
    from erftool.commands.figures import speed_panels
    panels, device = speed_panels(json.loads(_fake_bench(tmp_path).read_text()))
    assert set(panels) == {"forward", "forward + backward"}
    assert panels["forward"]["56x56_c64"] == {"conv3x3": 1.0, "dk_s4": 2.0}  # no reference
    assert "test cpu" in device and "processes" not in device
    merged = json.loads(_fake_bench(tmp_path).read_text())
    merged["meta"]["processes"] = 3  # bench_ops.py --processes 3
    assert speed_panels(merged)[1].endswith("median of 3 processes")
    gpu = {"environment": {"device": "GPU"}, "results": [
        {"shape": "s", "dtype": "float32", "ms": {"conv2d": {"fwd": 1, "fwd_bwd": 2},
                                                  "local_dk": {"error": "x"}}},
        {"shape": "s", "dtype": "bfloat16", "ms": {"conv2d": {"fwd": 9, "fwd_bwd": 9}}}]}
    panels, device = speed_panels(gpu)
    assert panels["forward"] == {"s": {"conv2d": 1.0}} and device == "GPU, float32"
    with pytest.raises(ValueError):
        speed_panels({"rows": []})


def test_paired_ratios_are_read_from_bench_rows(tmp_path):
    from erftool.commands.figures import paired_ratio_panels
    ratios = paired_ratio_panels(json.loads(_fake_bench(tmp_path).read_text()))
    assert ratios == {"forward": {"56x56_c64": {"dk_s4": 1.5}, "14x14_c256": {"dk_s4": 1.5}}}
    assert paired_ratio_panels({"results": []}) == {}


def test_figures_speed_and_growth(tmp_path, monkeypatch):
    from erftool.commands import figures as commands_figures
    monkeypatch.setattr(commands_figures, "GROWTH_DEPTHS", (1, 2, 4))
    monkeypatch.setattr(commands_figures, "GROWTH_DRAWS", 2)
    out = tmp_path / "figs"
    res = invoke("figures", "--out", str(out), "--only", "op_speed", "--only", "erf_growth",
                 "--bench-json", str(_fake_bench(tmp_path)), "-q")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["erf_growth.png", "op_speed.png"]


def test_figures_bad_input_exit_2(tmp_path, monkeypatch):
    from erftool.commands import models as commands_models
    out = tmp_path / "figs"
    res = CliRunner().invoke(cli.main, ["figures", "--only", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown figure" in res.output
    res = CliRunner().invoke(cli.main, ["figures", "--only", "op_speed", "--bench-json",
                                        str(tmp_path / "missing.json"), "--out", str(out)])
    assert res.exit_code == 2 and "No benchmark results" in res.output
    monkeypatch.setattr(commands_models, "bundled_dir", lambda: tmp_path / "none")
    res = CliRunner().invoke(cli.main, ["figures", "--only", "erf_comparison", "--out", str(out)])
    assert res.exit_code == 2 and "no bundled checkpoints" in res.output
    assert not out.exists()


def test_paper_figures_on_tiny_zoo_models(tmp_path, monkeypatch):
    from erftool.commands import paper as commands_paper
    from erftool.models import create_model
    models = []
    for op in ("rigid", "dc", "dk-local", "dk+dc"):
        torch.manual_seed(0)
        m = create_model(f"resnet-tiny-{op}", widths=(4, 4, 4)).eval()
        with torch.no_grad():  # untrained generators are zero; give them offsets to draw
            for mod in m.modules():
                for gen in ("kernel_offset", "data_offset"):
                    g = getattr(mod, gen, None)
                    if isinstance(g, nn.Conv2d):
                        g.weight.normal_(0, 0.05)
        models.append((op, m))
    monkeypatch.setattr(commands_paper, "_models", lambda: models)
    monkeypatch.setattr(commands_paper, "SCALE_IMAGES", 4)
    out = tmp_path / "figs"
    res = invoke("figures", "--out", str(out), "--only", "erf_comparison", "--only",
                 "kernel_sampling", "--only", "erf_vs_scale", "-q")
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.png"))) == 3
    fig = commands_paper.figure_sampling(0)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert any("deformable conv" in t for t in titles)
    assert any("deformable kernel" in t for t in titles)


def test_train_tiny_run_then_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m.pt"
    args = ["train", "resnet-tiny-rigid", "--out", str(out), "--epochs", "1", "--train-size",
            "16", "--val-size", "8", "-q", "--overwrite"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert out.exists()
    res = CliRunner().invoke(cli.main, args[:-1])
    assert res.exit_code == 2 and "exists" in res.output
    res = CliRunner().invoke(cli.main, ["train", "no-such-model", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_doctor_and_models():
    res = invoke("doctor", "--json")
    assert res.exit_code == 0 and "python" in json.loads(res.output)
    res = invoke("models")
    assert res.exit_code == 0 and "resnet-tiny-dk-local" in res.output


def test_real_loader_rejects_bad_checkpoints(tmp_path):
    """No stubs: erftool.checkpoint's own refusals reach the user as exit 2."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 10)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(3)}, plain)
    for ckpt, extra, needle in ((garbage, [], "garbage.pt"), (plain, [], "plain state_dict"),
                                (plain, ["--arch", "no-such-net"], "unknown model")):
        out = tmp_path / "o"
        res = CliRunner().invoke(cli.main, ["compare", str(ckpt), *extra, "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert not out.exists()
