"""EasyPhoto's face geometry, re-implemented line for line from its code, on fixed inputs:
writes crates/face/tests/fixtures/geometry.safetensors.

Sources (aigc-apps/sd-webui-EasyPhoto at 6c1f895):
* `safe_get_box_mask_keypoints` (scripts/easyphoto_utils/face_process_utils.py): box expansion by
  `crop_ratio` with clipping, int32 casts, left-to-right order by the expanded x1.
* scripts/preprocess.py: the roll-angle score, `compare_jpg_with_face_id` (pivot = mean embedding,
  score = dot product), the reference photo (argmax of angle x identity), the top 15, and the
  training mask (saliency > 128 and the ratio-1 box widened 30% and shifted down 15%, white
  background).

Detections are fixed numbers (boxes as Python floats, as modelscope's RetinaFace returns them via
`.tolist()`); embeddings are seeded: 14 noisy copies of one identity, 6 of others, so the top 15 is a
real cut. The saliency map and the crop come from tests/assets/astronaut.png.

    .venv-ref/bin/python tools/reference/face_image_geometry.py
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/face/tests/fixtures/geometry.safetensors"

# (image width, image height, crop ratio, boxes x1 y1 x2 y2, five keypoints each)
CASES = [
    (512, 512, 3.0, [[180.6, 95.2, 296.9, 240.7]], [[[209.3, 150.1], [262.8, 147.5], [238.4, 185.0], [214.9, 208.6], [259.2, 206.3]]]),
    (640, 427, 1.0, [[400.2, 30.9, 470.8, 120.1], [10.7, 200.5, 90.1, 300.6], [210.0, 100.0, 290.5, 199.9]],
     [[[420.5, 60.2], [450.1, 58.0], [436.0, 80.3], [423.0, 100.2], [449.5, 99.0]],
      [[30.2, 240.0], [68.9, 236.4], [50.0, 260.2], [33.1, 280.4], [66.6, 278.0]],
      [[230.0, 140.0], [270.0, 152.0], [250.0, 165.0], [233.0, 180.0], [266.0, 188.0]]]),
    (300, 200, 1.5, [[-4.3, 150.2, 60.6, 230.9], [250.9, -2.5, 320.2, 70.4]],
     [[[10.0, 170.0], [40.0, 171.0], [25.0, 185.0], [12.0, 200.0], [38.0, 201.0]],
      [[265.0, 20.0], [265.0, 40.0], [280.0, 30.0], [295.0, 22.0], [295.0, 38.0]]]),
    (1024, 768, 1.1, [[500.5, 300.5, 620.25, 450.75], [120.0, 330.0, 200.0, 430.0]],
     [[[530.0, 350.0], [590.0, 340.0], [560.0, 380.0], [535.0, 410.0], [585.0, 402.0]],
      [[140.0, 360.0], [180.0, 362.0], [160.0, 385.0], [145.0, 405.0], [178.0, 407.0]]]),
]


def safe_get_box_keypoints(w, h, boxes, keypoints, crop_ratio):
    """safe_get_box_mask_keypoints without the mask images (mask_type "crop")."""
    out_boxes, out_kps = [], []
    for index in range(len(boxes)):
        box = np.array(boxes[index])
        face_width = box[2] - box[0]
        face_height = box[3] - box[1]
        box[0] = np.clip(np.array(box[0], np.int32) - face_width * (crop_ratio - 1) / 2, 0, w - 1)
        box[1] = np.clip(np.array(box[1], np.int32) - face_height * (crop_ratio - 1) / 2, 0, h - 1)
        box[2] = np.clip(np.array(box[2], np.int32) + face_width * (crop_ratio - 1) / 2, 0, w - 1)
        box[3] = np.clip(np.array(box[3], np.int32) + face_height * (crop_ratio - 1) / 2, 0, h - 1)
        out_boxes.append(np.array(box, np.int32))
        out_kps.append(np.array(np.reshape(keypoints[index], [5, 2]), np.float32))
    out_boxes = np.array(out_boxes)
    order = np.argsort(out_boxes[:, 0])
    return out_boxes[order], np.array([out_kps[i] for i in order]), order


def roll_score(keypoint):
    x = keypoint[0, 0] - keypoint[1, 0]
    y = keypoint[0, 1] - keypoint[1, 1]
    angle = 0 if x == 0 else abs(math.atan(y / x) * 180 / math.pi)
    return (90 - angle) / 90


def compare_jpg_with_face_id(embedding_list):
    embedding_array = np.vstack(embedding_list)
    pivot_feature = np.mean(embedding_array, axis=0)
    pivot_feature = np.reshape(pivot_feature, [embedding_array.shape[1], 1])
    return [np.dot(emb, pivot_feature)[0][0] for emb in embedding_list]


def training_box_and_mask(sub_box, w, h):
    """preprocess.py: the ratio-1 box widened 30% and shifted down 15%, as a 0/1 mask."""
    sub_box = np.array(sub_box, np.int32)
    face_width = sub_box[2] - sub_box[0]
    face_height = sub_box[3] - sub_box[1]
    sub_box[0] = np.clip(np.array(sub_box[0], np.int32) - face_width * 0.3, 1, w - 1)
    sub_box[2] = np.clip(np.array(sub_box[2], np.int32) + face_width * 0.3, 1, w - 1)
    sub_box[1] = np.clip(np.array(sub_box[1], np.int32) + face_height * 0.15, 1, h - 1)
    sub_box[3] = np.clip(np.array(sub_box[3], np.int32) + face_height * 0.15, 1, h - 1)
    sub_mask = np.zeros((h, w, 3), np.uint8)
    sub_mask[sub_box[1] : sub_box[3], sub_box[0] : sub_box[2]] = 1
    return sub_box, sub_mask


def main():
    t = {}
    for i, (w, h, ratio, boxes, kps) in enumerate(CASES):
        t[f"case{i}.size"] = np.array([w, h], np.int32)
        t[f"case{i}.ratio"] = np.array([ratio], np.float64)
        t[f"case{i}.boxes"] = np.array(boxes, np.float64)
        t[f"case{i}.keypoints"] = np.array(kps, np.float64)
        out_boxes, out_kps, order = safe_get_box_keypoints(w, h, boxes, kps, ratio)
        t[f"case{i}.expanded"] = out_boxes.astype(np.int32)
        t[f"case{i}.order"] = order.astype(np.int32)
        t[f"case{i}.roll"] = np.array([roll_score(k) for k in out_kps], np.float64)

    # Identity ranking: 20 photos, unit-norm 512-d float32 embeddings.
    rng = np.random.default_rng(6)
    person = rng.standard_normal(512)
    embeddings = []
    for k in range(20):
        e = person + rng.standard_normal(512) * (0.6 if k < 14 else 3.0)
        e = (e / np.linalg.norm(e)).astype(np.float32)[None, :]
        embeddings.append(e)
    angles = np.array([roll_score(np.array([[0.0, 0.0], [40.0, 40.0 * math.tan(a)]], np.float32))
                       for a in rng.uniform(-0.5, 0.5, 20)], np.float64)
    scores = compare_jpg_with_face_id(embeddings)
    ref_total = np.array(angles) * np.array(scores)
    ref_indexes = np.argsort(ref_total)[::-1]
    top = np.argsort(np.array(scores))[::-1][:15]
    t["rank.embeddings"] = np.vstack(embeddings)
    t["rank.angles"] = angles
    t["rank.id_scores"] = np.array(scores, np.float32)
    t["rank.reference"] = np.array([ref_indexes[0]], np.int32)
    t["rank.top15"] = top.astype(np.int32)

    # Training mask on a crop of astronaut.png: saliency = its green channel, detection box fixed.
    astronaut = np.array(Image.open(ROOT / "crates/face/tests/assets/astronaut.png").convert("RGB"))
    crop = astronaut[40:232, 130:322]  # PIL image.crop((130, 40, 322, 232))
    hh, ww = crop.shape[:2]
    saliency = crop[:, :, 1].copy()
    ratio1_boxes, _, _ = safe_get_box_keypoints(ww, hh, [[52.7, 30.2, 140.9, 141.6]], [CASES[0][4][0]], 1.0)
    box, sub_mask = training_box_and_mask(ratio1_boxes[0], ww, hh)
    mask = np.float32(np.expand_dims(saliency > 128, -1)) * sub_mask
    out = np.array(crop) * np.array(mask) + np.ones_like(crop) * 255 * (1 - np.array(mask))
    t["train.crop"] = crop
    t["train.saliency"] = saliency
    t["train.ratio1_box"] = ratio1_boxes[0].astype(np.int32)
    t["train.box"] = box.astype(np.int32)
    t["train.image"] = np.uint8(out)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(t.items())}, OUT)


if __name__ == "__main__":
    main()
