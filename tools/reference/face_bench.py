#!/usr/bin/env python3
"""insightface 2.1 side of `crates/face/benches/detect_align_embed.rs`: SCRFD detection, then
`norm_crop` + ArcFace for every face (`ArcFaceONNX.get`, split into its two steps for timing), on the same random models, the same 1280-px photo (the
640-px PNG enlarged with Pillow's bilinear filter) and the same onnxruntime thread count.

    .venv-ref/bin/python tools/reference/face_bench.py --threads 1 --runs 10
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

ASSETS = Path(__file__).resolve().parents[2] / "crates" / "face" / "tests" / "assets"


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1

    def session(name):
        return ort.InferenceSession(str(ASSETS / name), sess_options=opts, providers=["CPUExecutionProvider"])

    det = SCRFD(str(ASSETS / "scrfd_random.onnx"), session=session("scrfd_random.onnx"))
    det.prepare(ctx_id=-1, input_size=(640, 640))
    rec = ArcFaceONNX(str(ASSETS / "arcface_random.onnx"), session=session("arcface_random.onnx"))
    small = Image.open(ASSETS / "faceapi_sample1_640.png").convert("RGB")
    img = small.resize((1280, small.height * 2), Image.Resampling.BILINEAR)
    bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])

    def run():
        start = time.perf_counter()
        boxes, kpss = det.detect(bgr, input_size=(640, 640))
        detected = time.perf_counter() - start
        crops = [face_align.norm_crop(bgr, kps, 112) for kps in kpss]  # what ArcFaceONNX.get does
        aligned = time.perf_counter() - start
        for crop in crops:
            rec.get_feat(crop)
        return len(boxes), detected, aligned - detected, time.perf_counter() - start - aligned

    faces = run()[0]  # warm-up
    times = sorted((run()[1:] for _ in range(args.runs)), key=sum)
    median, best = times[len(times) // 2], times[0]
    print(json.dumps({"impl": "insightface", "threads": args.threads, "faces": faces,
                      "median_s": round(sum(median), 5), "best_s": round(sum(best), 5),
                      "median_detect_s": round(median[0], 5), "median_align_s": round(median[1], 5),
                      "median_embed_s": round(median[2], 5)}))


if __name__ == "__main__":
    main()
