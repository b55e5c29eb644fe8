"""A u2netp.onnx that loads and runs like the real one but finds no subject in any image.

    python e2e/images/broken_model.py OUT_DIR    # writes OUT_DIR/u2netp.onnx, prints sha256:<hex>

For the inference canary's tests: the server refuses the file unless told its digest
(REMBG_MODEL_CHECKSUMS='{"u2netp": "sha256:<hex>"}'), then serves it like any u2netp and the
canary sees the empty cutouts (reason `iou`).

The graph has u2netp's interface exactly: input `input.1` float32 [1, 3, 320, 320], outputs
`1959`..`1965` float32 [1, 1, 320, 320] (opset 11, as rembg's export). Every output is zero
except one pixel, the top-left corner, which is 1. The server (like rembg) min-max normalises
the prediction, so a constant output would divide by zero; this one normalises to a mask that is
0 everywhere but that corner, the background of any photo. The input is used (multiplied by 0
and added) so the graph is an honest function of it, and the batch axis may be made dynamic.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

INPUT_NAME = "input.1"
OUTPUT_NAMES = ("1959", "1960", "1961", "1962", "1963", "1964", "1965")
SIDE = 320
OPSET = 11
IR_VERSION = 6
FILE_NAME = "u2netp.onnx"


def build_model() -> bytes:
    """The serialized model (deterministic bytes, ~1 KB)."""
    last = SIDE - 1
    initializers = [
        helper.make_tensor("corner", TensorProto.FLOAT, [1, 1, 1, 1], [1.0]),
        helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 0, 0, 0, 0, last, last]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        # [1,1,S,S]: 1 at (0, 0), 0 elsewhere
        helper.make_node("Pad", ["corner", "pads", "zero"], ["spot"], mode="constant"),
        # [N,1,S,S] of zeros that depends on the input, so the batch axis follows it
        helper.make_node("ReduceMean", [INPUT_NAME], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "spot"], ["prediction"]),
        *(helper.make_node("Identity", ["prediction"], [name]) for name in OUTPUT_NAMES),
    ]
    graph = helper.make_graph(
        nodes,
        "u2netp-broken",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, SIDE, SIDE])
            for name in OUTPUT_NAMES
        ],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="rembg-fleet e2e/images/broken_model.py",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    serialized: bytes = model.SerializeToString()
    return serialized


def write(out_dir: Path) -> str:
    """Write OUT_DIR/u2netp.onnx; returns its digest as REMBG_MODEL_CHECKSUMS takes it."""
    data = build_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FILE_NAME).write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python e2e/images/broken_model.py OUT_DIR\n")
        return 2
    print(write(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
