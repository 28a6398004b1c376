"""Face detection with CenterFace on onnxruntime's CPU execution provider.

The model (``models/centerface.onnx``) takes an RGB image as float NCHW with sides that are
multiples of 32 and returns four maps at a quarter of the input size: a face-centre heatmap,
log box sizes, centre offsets and landmarks (unused here). Boxes come back in the pixels of the
frame that was passed in and may reach beyond its edges, since the frame is padded before
inference so that faces cut by the edge are still found.
"""

from __future__ import annotations

from importlib import resources

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from blurd.engines.local.arrays import Image

MODEL_PACKAGE = "blurd.engines.local"  # package data: models/centerface.onnx
MODEL_FILE = "centerface.onnx"
PROVIDER = "CPUExecutionProvider"
INPUT_NAME = "input.1"
OUTPUT_NAMES = ("537", "538", "539", "540")
STRIDE_PX = 4  # output maps are a quarter of the input size
INPUT_MULTIPLE_PX = 32

THRESHOLD = 0.2  # 0.5 loses every face under about 20 px
NMS_IOU = 0.3
# Before inference the frame is mirrored outwards by at least this share of its shorter side
# (and up to the next multiple of 32): a face cut by the edge then meets its mirror image,
# which the detector reads as a whole face. On EgoBlur crops cutting 50-70 % of a face away,
# mirrored borders found 34-35 of 36 faces (3 % to 10 % alike) where black borders missed most;
# 3 % costs about 5 % more inference time at 640x360, 10 % about 35 %.
EDGE_PAD_FRACTION = 0.03

Boxes = npt.NDArray[np.float32]  # (N, 5): x1, y1, x2, y2, score


def empty_boxes() -> Boxes:
    return np.zeros((0, 5), dtype=np.float32)


def model_bytes() -> bytes:
    """The converted CenterFace model shipped inside the package."""
    return resources.files(MODEL_PACKAGE).joinpath("models", MODEL_FILE).read_bytes()


class FaceDetector:
    """One onnxruntime session; create it once per process and reuse it for every frame."""

    def __init__(self, *, threads: int = 1, model: bytes | None = None) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the encoder's threads share the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # the model carries unused initializers; not worth a warning
        self.session = ort.InferenceSession(
            model if model is not None else model_bytes(), sess_options=opts, providers=[PROVIDER]
        )

    def detect(
        self,
        bgr: Image,
        *,
        infer_width: int | None = None,
        threshold: float = THRESHOLD,
    ) -> Boxes:
        """Faces in a BGR frame, in that frame's pixels.

        ``infer_width`` downscales the frame for inference when it is wider (faster, but
        small faces are lost); ``None`` infers at full resolution.
        """
        height, width = bgr.shape[:2]
        scale = 1.0
        image = bgr
        if infer_width is not None and width > infer_width:
            scale = infer_width / width
            size = (infer_width, max(1, round(height * scale)))
            image = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        pad = round(EDGE_PAD_FRACTION * min(image.shape[:2]))
        blob, offset = _to_blob(image, pad)
        heat, size, shift, _ = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: blob})
        boxes = _decode(heat[0, 0], size[0], shift[0], threshold)
        if len(boxes) == 0:
            return empty_boxes()
        boxes = boxes[_nms(boxes, NMS_IOU)]
        boxes[:, 0:4] -= offset
        boxes[:, 0:4] /= scale
        return boxes


def _to_blob(image: Image, pad: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Mirror ``pad`` pixels out on every side, then up to multiples of 32; RGB float NCHW.

    Returns the blob and the (x, y, x, y) offset of the frame inside it.
    """
    h, w = image.shape[:2]
    full_h = -(-(h + 2 * pad) // INPUT_MULTIPLE_PX) * INPUT_MULTIPLE_PX
    full_w = -(-(w + 2 * pad) // INPUT_MULTIPLE_PX) * INPUT_MULTIPLE_PX
    top = (full_h - h) // 2
    left = (full_w - w) // 2
    canvas = cv2.copyMakeBorder(
        image, top, full_h - h - top, left, full_w - w - left, cv2.BORDER_REFLECT
    )
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    blob = np.ascontiguousarray(rgb.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)
    offset = np.array([left, top, left, top], dtype=np.float32)
    return blob, offset


def _decode(
    heat: npt.NDArray[np.float32],
    size: npt.NDArray[np.float32],
    shift: npt.NDArray[np.float32],
    threshold: float,
) -> Boxes:
    """Heatmap peaks above ``threshold`` to boxes in input pixels."""
    rows, cols = np.nonzero(heat > threshold)
    if len(rows) == 0:
        return empty_boxes()
    box_h = np.exp(size[0, rows, cols]) * STRIDE_PX
    box_w = np.exp(size[1, rows, cols]) * STRIDE_PX
    cy = (rows + shift[0, rows, cols] + 0.5) * STRIDE_PX
    cx = (cols + shift[1, rows, cols] + 0.5) * STRIDE_PX
    boxes = np.stack(
        [cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2, heat[rows, cols]],
        axis=1,
    )
    return boxes.astype(np.float32)


def _nms(boxes: Boxes, iou_limit: float) -> npt.NDArray[np.intp]:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    x1, y1, x2, y2, score = boxes.T
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-score)
    keep: list[int] = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(int(best))
        iw = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = iw * ih
        iou = inter / (area[best] + area[rest] - inter + 1e-6)
        order = rest[iou < iou_limit]
    return np.array(keep, dtype=np.intp)
