"""benchmarks/gpu.py, the GPU check script, on the CPU: the GPU-against-CPU accuracy comparison flags a gap
over 2 points, and on a GPU it runs its sweeps. (Its tiny run on the CPU: tests/test_sweeps.py.)"""
import importlib.util

import pandas as pd

from conftest import ROOT

VARIANTS = {"bn", "gn", "ln", "bn+l1 (λ=1e-05)"}  # the default sweep's, as analysis.trial_label writes them


def _load_gpu_script():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_after(lines: list, heading: str) -> list:
    """The markdown table under the line starting with `heading`, as dicts of cell text."""
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = table[0], table[2:]  # table[1] is the |---| rule
    return [dict(zip(header, row)) for row in rows]


def test_accuracy_gap_over_two_points_is_flagged():
    gpu = _load_gpu_script()

    def table(accs):
        return pd.DataFrame({"variant": ["bn", "gn", "ln"], "seed": [0, 0, 0], "epoch 1 one-view %": accs})

    gaps = gpu.accuracy_gaps(table([80.0, 79.0, 70.0]), table([79.5, 81.5, 72.0]))
    assert gaps["variant"].tolist() == ["bn", "gn", "ln"]
    assert gaps["GPU - CPU (points)"].tolist() == [0.5, -2.5, -2.0]
    assert gaps["suspicious"].tolist() == [False, True, False]
    text = gpu.markdown(gaps)
    assert text.splitlines()[0] == "| variant | seed | GPU % | CPU reference % | GPU - CPU (points) | suspicious |"
    assert "| gn | 0 | 79.00 | 81.50 | -2.50 | True |" in text


def _trial_rows(device: str, precision: str, epochs: int, accs: list, rate: float) -> pd.DataFrame:
    return pd.DataFrame({"variant": sorted(VARIANTS), "seed": 0, "device": device, "precision": precision,
                         "epochs": epochs, "img/s epoch 1": rate / 2,
                         "img/s later (median)": rate if epochs > 1 else float("nan"),
                         "train s": 10.0, "peak MiB": 300.0 if device != "cpu" else float("nan"),
                         "epoch 1 one-view %": accs, "final one-view %": accs})


def test_on_a_gpu_it_runs_the_sweep_a_1_epoch_sweep_and_the_cpu_reference(monkeypatch, capsys, tmp_path):
    """The GPU branch without a GPU: torch says it sees one, the sweeps are recorded, their tables made up."""
    gpu = _load_gpu_script()
    monkeypatch.setattr(gpu.torch.cuda, "device_count", lambda: 1)
    ran = {}
    monkeypatch.setattr(gpu, "run_sweep", lambda name, flags, storage, quiet: ran.setdefault(name, flags) and 60.0)
    device = "cuda:0 NVIDIA H200 (sm_90)"
    tables = {"gpu_default": _trial_rows(device, "bf16", 20, [84.0, 84.5, 83.0, 82.0], 20_000.0),
              "gpu_epoch1": _trial_rows(device, "bf16", 1, [84.0, 84.5, 83.0, 80.0], 10_000.0),
              "cpu_reference": _trial_rows("cpu", "fp32", 1, [84.5, 84.0, 83.5, 82.5], 1_000.0)}
    monkeypatch.setattr(gpu, "trial_rows", lambda experiment: tables[experiment.name])
    gpu.main(["--epochs", "20", "--storage-path", str(tmp_path)])
    out = capsys.readouterr().out
    assert list(ran) == ["gpu_default", "gpu_epoch1", "cpu_reference"]
    assert "--gpus-per-trial" not in ran["gpu_default"] and ran["gpu_default"][-2:] == ["--epochs", "20"]
    assert ran["gpu_epoch1"][-2:] == ["--epochs", "1"]
    assert ran["cpu_reference"][-8:] == ["--epochs", "1", "--gpus-per-trial", "0", "--precision", "fp32",
                                         "--compile", "off"]
    # the 20-epoch sweep's median after epoch 1 against the CPU's one epoch
    assert "GPU over CPU reference, img/s over all trials: 40.00x (80,000 against 2,000;" in out
    gaps = _table_after(out.splitlines(), "accuracy after 1 epoch")  # the 1-epoch sweep's, not epoch 1 of 20
    assert [(row["variant"], row["GPU - CPU (points)"], row["suspicious"]) for row in gaps] == [
        ("bn", "-0.50", "no"), ("bn+l1 (λ=1e-05)", "0.50", "no"), ("gn", "-0.50", "no"), ("ln", "-2.50", "SUSPICIOUS")]
    assert "largest gap 2.50 points: suspicious" in out and "warning" not in out


def test_a_trial_given_no_gpu_trains_on_the_cpu_though_cuda_is_visible(monkeypatch):
    """Ray 2.60 left the GPU visible to `--gpus-per-trial 0` trials on an H200 machine, and they trained on it (measured
    with benchmarks/gpu.py); a trial's device follows what Ray gave it, not what CUDA shows."""
    import torch

    import train
    import trainable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    config = {"precision": "auto", "compile": "off"}
    given_none = train.runtime(config, trainable.trial_device({"CPU": 1.0, "GPU": 0}))
    assert given_none[0].type == "cpu" and given_none[1] == "fp32"
    assert train.runtime(config, trainable.trial_device({"CPU": 1.0}))[0].type == "cpu"  # no GPU key at all
    given_a_share = train.runtime(config, trainable.trial_device({"CPU": 1.0, "GPU": 0.25}))
    assert given_a_share[0].type == "cuda" and given_a_share[1] == "bf16"
