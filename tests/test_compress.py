"""compress: int8 quantisation of the exported graph, measured by the same eval code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import cli
from tests.test_lm import lm_config


def copy_run(source_config: Path, tmp: Path) -> Path:
    shutil.copytree(source_config.parent / "run", tmp / "run")
    return Path(shutil.copy(source_config, tmp / source_config.name))


def compress(config: Path, *steps: str) -> dict:
    result = cli("compress", "-c", config, "--set", f"compress.steps=[{', '.join(steps)}]", "--json", "-q")
    assert result.code == 0, result.stderr
    return result.json()


def test_dynamic_int8_shrinks_digits_and_keeps_accuracy(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, "{method: quantize}")
    fp32, int8 = out["steps"]
    assert int8["weight_bytes"] < 0.35 * fp32["weight_bytes"]
    assert int8["metrics"]["accuracy"] >= fp32["metrics"]["accuracy"] - 0.02
    report = json.loads((tmp_path / "run" / "compress" / "report.json").read_text())
    assert [row["name"] for row in report["steps"]] == ["fp32 (export)", "1: quantize dynamic"]
    model = onnx.load(out["model"])
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in model.graph.node)
    # eval and infer take the int8 file as it is (its metadata was carried over).
    evaluated = cli("eval", "-c", config, "--set", f"eval.checkpoint={out['model']}", "--json", "-q")
    assert evaluated.json()["accuracy"] == pytest.approx(int8["metrics"]["accuracy"])
    predicted = cli("infer", "-c", config, "--set", f"infer.model={out['model']}", "--json", "-q")
    assert predicted.code == 0 and predicted.json()["accuracy"] == pytest.approx(int8["metrics"]["accuracy"])


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_with_each_calibration(digits_run: Path, tmp_path: Path, calibration: str) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, f"{{method: quantize, mode: static, calibration: {calibration}, calibration_batches: 4}}")
    fp32, int8 = out["steps"]
    assert int8["metrics"]["accuracy"] >= fp32["metrics"]["accuracy"] - 0.03
    ops = {node.op_type for node in onnx.load(out["model"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_gpt_int8_stays_close_and_still_generates(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=30)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    out = compress(config, "{method: quantize, per_channel: true}")
    fp32, int8 = out["steps"]
    assert abs(int8["metrics"]["loss"] - fp32["metrics"]["loss"]) < 0.05 * fp32["metrics"]["loss"]
    generated = cli(
        "infer", "--model", out["model"], "--prompt", "def ", "-n", "5", "-t", "0", "--json", "-o", tmp_path / "g.jsonl"
    )
    assert generated.code == 0, generated.stderr


def test_bad_compress_settings_are_user_errors(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    empty = cli("compress", "-c", config)
    assert empty.code == 2 and "compress.steps is empty" in empty.stderr
    bad = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, calibration: kmeans}]")
    assert bad.code == 2 and "compress.steps.0.calibration" in bad.stderr
    zero = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, calibration_batches: 0}]")
    assert zero.code == 2 and "calibration_batches" in zero.stderr
    (tmp_path / "run" / "prepare" / "data.safetensors").unlink()
    missing = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, mode: static}]")
    assert missing.code == 2 and "needs the prepared training data" in missing.stderr


def test_pipeline_runs_compress_when_steps_are_configured(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    result = cli("pipeline", "-c", config, "--set", "compress.steps=[{method: quantize}]", "--json", "-q")
    assert result.code == 0, result.stderr
    stages = result.json()["stages"]
    assert stages["train"] == {"skipped": True} and "report" in stages["compress"]


# ---- pruning


def overall(per_layer: dict[str, float]) -> float:
    """Weighted sparsity of the tiny digits MLP's two weight matrices (64x32 and 32x10)."""
    sizes = {"net.0.weight": 64 * 32, "net.2.weight": 32 * 10}
    return sum(per_layer[k] * n for k, n in sizes.items()) / sum(sizes.values())


def test_unstructured_pruning_hits_its_sparsity_globally_and_per_layer(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, "{method: prune, sparsity: 0.6}")
    fp32, pruned = out["steps"]
    report = json.loads((tmp_path / "run" / "compress" / "report.json").read_text())
    assert overall(report["sparsity_per_layer"]["1: prune unstructured 0.6"]) == pytest.approx(0.6, abs=0.01)
    assert pruned["nonzeros"] < 0.5 * fp32["nonzeros"]

    config = copy_run(digits_run, tmp_path / "per_layer")
    compress(config, "{method: prune, sparsity: 0.6, scope: layer}")
    report = json.loads((tmp_path / "per_layer" / "run" / "compress" / "report.json").read_text())
    assert all(
        v == pytest.approx(0.6, abs=0.01) for v in report["sparsity_per_layer"]["1: prune unstructured 0.6"].values()
    )


def test_finetuning_keeps_pruned_weights_at_zero(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, "{method: prune, sparsity: 0.5, schedule: gradual, rounds: 2, finetune_steps: 40}")
    layers = json.loads((tmp_path / "run" / "compress" / "report.json").read_text())["sparsity_per_layer"]
    assert overall(next(iter(layers.values()))) >= 0.49  # a global threshold: layers differ, the total holds
    assert out["steps"][1]["metrics"]["accuracy"] > 0.8


def test_structured_pruning_makes_the_mlp_smaller(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, "{method: prune, kind: structured, sparsity: 0.25}", "{method: quantize}")
    fp32, pruned, int8 = out["steps"]
    assert pruned["parameters"] < fp32["parameters"] and pruned["file_bytes"] < fp32["file_bytes"]
    from bigmodel.checkpoint import read_manifest

    assert read_manifest(Path(out["checkpoint"])).architecture.hidden_sizes == (24,)
    assert int8["file_bytes"] < pruned["file_bytes"]


def test_structured_pruning_of_gpt_mlp_neurons_exports_and_generates(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=20)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    out = compress(config, "{method: prune, kind: structured, sparsity: 0.25, finetune_steps: 5}")
    fp32, pruned = out["steps"]
    from bigmodel.checkpoint import read_manifest

    assert read_manifest(Path(out["checkpoint"])).architecture.mlp_hidden == (96,)
    assert pruned["file_bytes"] < fp32["file_bytes"]
    generated = cli(
        "infer", "--model", out["model"], "--prompt", "def ", "-n", "5", "-t", "0", "--json", "-o", tmp_path / "g.jsonl"
    )
    assert generated.code == 0, generated.stderr


def test_bad_pruning_settings_are_user_errors(digits_run: Path) -> None:
    for steps, expected in (
        ("[{method: prune, sparsity: 1.0}]", "compress.steps.0.sparsity"),
        ("[{method: prune, sparsity: -0.1}]", "compress.steps.0.sparsity"),
        ("[{method: quantize}, {method: prune}]", "must be the last step"),
        ("[{method: prune, kind: channels}]", "compress.steps.0.kind"),
    ):
        result = cli("compress", "-c", digits_run, "--set", f"compress.steps={steps}")
        assert result.code == 2 and expected in result.stderr, result.stderr


# ---- distillation


def test_distilled_student_is_smaller_and_trained_by_the_normal_loop(digits_run: Path, tmp_path: Path) -> None:
    config = copy_run(digits_run, tmp_path)
    out = compress(config, "{method: distill, student: {hidden_sizes: [8]}, steps: 60, temperature: 3.0}")
    teacher, student = out["steps"]
    assert student["parameters"] < teacher["parameters"]
    assert student["metrics"]["accuracy"] > 0.5
    log = (tmp_path / "run" / "compress" / "step1" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 60


def test_alpha_zero_is_plain_training_of_the_same_student(digits_run: Path, tmp_path: Path) -> None:
    """With alpha 0 the distillation loss is exactly cross-entropy: the scratch control."""
    import torch

    from bigmodel.compress.distill import distillation_loss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    out, x, y = torch.randn(5, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(distillation_loss(teacher, 0.0, 2.0)(out, x, y), torch.nn.functional.cross_entropy(out, y))
    # alpha 1 is the softened KL alone, scaled by T^2; it vanishes when student == teacher.
    same = teacher(x).detach()
    assert distillation_loss(teacher, 1.0, 2.0)(same, x, y).item() == pytest.approx(0.0, abs=1e-6)


def test_student_with_another_vocabulary_or_bad_settings_is_refused(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=5)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    # Re-prepare other text: the teacher's vocabulary no longer matches the data the student learns.
    (tmp_path / "other.txt").write_text("abc abc abc\n" * 500)
    cli("prepare", "-c", config, "--set", f"data.path={tmp_path / 'other.txt'}", "-q")
    result = cli(
        "compress",
        "-c",
        config,
        "--set",
        f"data.path={tmp_path / 'other.txt'}",
        "--set",
        "compress.steps=[{method: distill, student: {n_layer: 1}, steps: 2}]",
    )
    assert result.code == 2 and "must share the tokenizer" in result.stderr
    bad = cli("compress", "-c", config, "--set", "compress.steps=[{method: distill, student: {n_layr: 1}}]")
    assert bad.code == 2 and "student: n_layr: unknown key (did you mean 'n_layer'?)" in bad.stderr
    alpha = cli("compress", "-c", config, "--set", "compress.steps=[{method: distill, student: {}, alpha: 1.5}]")
    assert alpha.code == 2 and "compress.steps.0.alpha" in alpha.stderr


def test_structured_pruning_of_attention_heads_keeps_one_cache_shape(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=20)  # 2 heads of 16 in one layer
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    out = compress(
        config,
        "{method: prune, kind: structured, structure: heads, sparsity: 0.5, finetune_steps: 4}",
        "{method: quantize, mode: static, calibration_batches: 2}",
    )
    fp32, pruned, _int8 = out["steps"]
    from bigmodel.checkpoint import read_manifest

    arch = read_manifest(Path(out["checkpoint"])).architecture
    assert (arch.n_head, arch.head_size) == (1, 16)
    assert pruned["parameters"] == fp32["parameters"] - 4 * 32 * 16  # q, k, v rows and c_proj columns
    generated = cli(
        "infer", "--model", out["model"], "--prompt", "def ", "-n", "5", "-t", "0", "--json", "-o", tmp_path / "g.jsonl"
    )
    assert generated.code == 0, generated.stderr


def test_heads_are_refused_for_a_tabular_model(digits_run: Path) -> None:
    result = cli(
        "compress", "-c", digits_run, "--set", "compress.steps=[{method: prune, kind: structured, structure: heads}]"
    )
    assert result.code == 2 and "structure 'heads' needs model.family 'gpt'" in result.stderr


def test_int4_weight_only_quantisation_of_a_language_model(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=20)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    out = compress(config, "{method: quantize, bits: 4, block_size: 16, accuracy_level: 4}")
    fp32, int4 = out["steps"]
    assert int4["name"] == "1: quantize int4 block 16" and out["model"].endswith("model.int4.onnx")
    ops = {node.op_type for node in onnx.load(out["model"]).graph.node}
    assert "MatMulNBits" in ops
    assert int4["file_bytes"] < fp32["file_bytes"]
    assert abs(int4["metrics"]["loss"] - fp32["metrics"]["loss"]) < 0.1 * fp32["metrics"]["loss"]
    generated = cli(
        "infer", "--model", out["model"], "--prompt", "def ", "-n", "5", "-t", "0", "--json", "-o", tmp_path / "g.jsonl"
    )
    assert generated.code == 0, generated.stderr
    static = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, bits: 4, mode: static}]")
    assert static.code == 2 and "weight-only" in static.stderr
    odd = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, bits: 4, block_size: 24}]")
    assert odd.code == 2 and "power of 2" in odd.stderr
    bits = [
        next(a.i for a in node.attribute if a.name == "bits")
        for node in onnx.load(out["model"]).graph.node
        if node.op_type == "MatMulNBits"
    ]
    assert bits.count(8) == 1 and set(bits) == {4, 8}  # the head in 8-bit blocks (the default), the rest 4-bit
    # The head at int4 too, and the embedding table in 4 bits; what a user reads on stderr: no library log
    # lines, a table whose columns do not run together, and what the metric was measured on.
    shown = cli(
        "compress",
        "-c",
        config,
        "--set",
        "compress.steps=[{method: quantize, bits: 4, block_size: 16, head: int4, embeddings: true}]",
        "--json",
    )
    assert shown.code == 0, shown.stderr
    kept = shown.json()
    lines = shown.stderr.splitlines()
    assert not any("INFO" in line or "onnxruntime" in line for line in lines), shown.stderr
    header = next(line for line in lines if line.startswith("step"))
    assert header.split() == ["step", "params", "non-zero", "file", "weights", "loss", "latency", "ms"]
    row = lines[lines.index(header) + 1]
    assert row.startswith("fp32 (export)") and len(row) == len(header) and "  " in row.removeprefix("fp32 (export)")
    tokens = kept["steps"][0]["measured_on"]["count"]
    assert f"compress: loss measured on {tokens:,} tokens" in shown.stderr and tokens > 0
    graph = onnx.load(kept["model"]).graph
    ops = [node.op_type for node in graph.node]
    assert all(a.i == 4 for node in graph.node for a in node.attribute if a.name == "bits")
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    assert kept["steps"][1]["file_bytes"] < int4["file_bytes"]  # the embedding table and the head shrank
    assert abs(kept["steps"][1]["metrics"]["loss"] - fp32["metrics"]["loss"]) < 0.1 * fp32["metrics"]["loss"]
    wrong = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, head: int4}]")
    assert wrong.code == 2 and "bits 4 options" in wrong.stderr


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "fp32"])
def test_weights_already_on_a_4bit_grid_keep_it_exactly(kind: str, tmp_path: Path) -> None:
    """A MatMul whose weight is m + d * k per block of 32 inputs (as a Q4_1 GGUF's; Q4_0: m = -8d, some
    levels unused) becomes MatMulNBits + the per-block offset term, computing the same products; other
    weights stay as they are."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bigmodel.compress import grids

    rng = np.random.default_rng(0)
    K, N = 64, 24
    d = rng.uniform(0.01, 0.1, size=(N, K // 32, 1))
    m = -8 * d if kind == "q4_0" else rng.uniform(-0.5, 0.0, size=(N, K // 32, 1))
    on_grid = (m + d * rng.integers(0, 16, size=(N, K // 32, 32))).reshape(N, K).T
    weight = (on_grid if kind != "fp32" else rng.normal(size=(K, N))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    replaced, corrections = grids.keep_grids(model, None, set())
    ops = [node.op_type for node in model.graph.node]
    if kind == "fp32":
        assert replaced == 0 and ops == ["MatMul"]
        return
    assert replaced == 1 and ops.count("MatMulNBits") == 1 and "ReduceSum" in ops  # block sums, exact
    assert [n.op_type for n in model.graph.node if n.name in corrections] == ["MatMul"]  # left in fp32
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.normal(size=(3, K)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - x @ weight).max() < 1e-4


@pytest.mark.parametrize("head_kind", ["q8_0", "random"])
def test_int4_keeps_grid_corrections_in_fp32_and_puts_only_the_head_in_8_bits(head_kind: str, tmp_path: Path) -> None:
    """The 8-bit pass over the output head must not touch keep_grids' fp32 correction products (the
    quantizer adds nodes_to_include to every MatMul it would quantise anyway); a head on a Q8_0 grid (a
    GGUF's token embedding, tied) keeps that grid exactly, any other is rounded to 8-bit blocks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bigmodel.compress import quantize
    from bigmodel.config import QuantizeStep

    rng = np.random.default_rng(0)
    K, N, V = 64, 32, 40
    d = rng.uniform(0.01, 0.1, size=(N, K // 32, 1))
    grid = rng.uniform(-0.5, 0.0, size=(N, K // 32, 1)) + d * rng.integers(0, 16, size=(N, K // 32, 32))
    weight = grid.reshape(N, K).T.astype(np.float32)
    head = rng.normal(size=(N, V)).astype(np.float32)
    if head_kind == "q8_0":  # d * k per block of 32 inputs, d = the block's largest magnitude / 127
        blocks = rng.integers(-127, 128, size=(V, N // 32, 32))
        blocks[..., 0] = 127
        head = (rng.uniform(0.001, 0.01, size=(V, N // 32, 1)) * blocks).reshape(V, N).T.astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, V])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(head, "head")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "in.onnx"))
    quantize._int4(tmp_path / "in.onnx", tmp_path / "out.onnx", QuantizeStep(bits=4, accuracy_level=0))
    model = onnx.load(str(tmp_path / "out.onnx"))
    nbits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert sorted(nbits.values()) == [4, 8]  # the grid matrix keeps its 4-bit grid, the head alone is 8-bit
    assert ("lm_head_Q8G" in nbits) == (head_kind == "q8_0")
    assert [n.op_type for n in model.graph.node].count("MatMul") == 1  # the correction, still fp32
    x = rng.normal(size=(3, K)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ weight @ head
    tolerance = 1e-4 if head_kind == "q8_0" else 0.02  # the kept grid is exact (fp32 compute)
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()


def test_products_of_one_input_merge_into_one_matmul_and_compute_the_same(tmp_path: Path) -> None:
    """Export's graph pass: MatMuls of one input with their own constant weights (SwiGLU's gate and up)
    become one MatMul + Split, made from the weights as they are written; a weight another node also reads
    stays where it is."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from bigmodel.export.weightless import GraphWeights

    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(8, n)).astype(np.float32) for name, n in [("a", 5), ("b", 7), ("shared", 3)]}
    nodes = [helper.make_node("MatMul", ["x", w], [f"y_{w}"], name=f"mm_{w}") for w in ("a", "b", "shared")]
    nodes.append(helper.make_node("Identity", ["shared"], ["shared_copy"]))
    shapes = {"y_a": [None, 5], "y_b": [None, 7], "y_shared": [None, 3], "shared_copy": [8, 3]}
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]

    def model(initializers: list) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])], outputs, initializers
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    x = rng.normal(size=(4, 8)).astype(np.float32)
    whole = model([numpy_helper.from_array(w, name) for name, w in weights.items()])
    before = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    plan = GraphWeights(
        model([]), {name: list(w.shape) for name, w in weights.items()}, lambda name: torch.from_numpy(weights[name])
    )
    assert plan.merge_shared_input_matmuls() == 1
    plan.write(tmp_path / "merged.onnx")
    onnx.checker.check_model(str(tmp_path / "merged.onnx"), full_check=True)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "merged.onnx")).graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    for want, got in zip(before, session.run(None, {"x": x})):
        assert np.allclose(want, got, atol=1e-6)


def test_a_difference_within_the_measurements_noise_is_called_so() -> None:
    from bigmodel.compress.measure import standard_error, too_close

    def row(name: str, loss: float, stderr: float) -> dict:
        return {
            "name": name,
            "metric": "loss",
            "metrics": {"loss": loss},
            "stderr": stderr,
            "measured_on": {"count": 37, "unit": "tokens"},
        }

    # 37 tokens: int4's loss 1.08 < fp32's 1.39 says nothing (each +-0.3)
    assert too_close([row("fp32", 1.39, 0.3), row("int4", 1.08, 0.3)]) == [
        "int4 differs from fp32 by -0.31 in loss, less than the noise (+-0.85) of 37 tokens"
    ]
    assert too_close([row("fp32", 1.39, 0.01), row("int4", 1.08, 0.01)]) == []  # 10,000s of tokens: it is real
    assert standard_error({"accuracy": 0.5}, "accuracy", 100) == 0.05  # a rate's binomial error
    assert standard_error({"mse": 1.0}, "mse", 100) is None  # unknown: no claim either way
