//! EasyPhoto's box rules, ranking and training mask against `tools/reference/face_image_geometry.py`
//! (its code re-run in numpy on fixed detections): integer boxes and orders must be identical.

mod fixture_io;

use easyphoto_face::geometry::{crop, expand_box, left_to_right, roll_score, training_box};
use easyphoto_face::masks::{on_white, training_mask};
use easyphoto_face::ranking::{TRAINING_PHOTOS, rank_photos};
use fixture_io::Fixture;
use image::{GrayImage, RgbImage};

fn boxes_i32(values: &[f64]) -> Vec<[i32; 4]> {
    values.chunks_exact(4).map(|b| [b[0] as i32, b[1] as i32, b[2] as i32, b[3] as i32]).collect()
}

#[test]
fn expanded_boxes_order_and_roll_match_easyphoto() -> anyhow::Result<()> {
    let fx = Fixture::open("geometry.safetensors")?;
    for case in 0..4 {
        let get = |what: &str| fx.get(&format!("case{case}.{what}"));
        let size = get("size")?.values;
        let (w, h) = (size[0] as u32, size[1] as u32);
        let ratio = get("ratio")?.values[0];
        let detections = get("boxes")?.values;
        let landmarks = get("keypoints")?.values;

        let expanded: Vec<[i32; 4]> =
            detections.chunks_exact(4).map(|b| expand_box([b[0], b[1], b[2], b[3]], ratio, w, h)).collect();
        let order = left_to_right(&expanded);
        let expected_order: Vec<usize> = get("order")?.values.iter().map(|&i| i as usize).collect();
        assert_eq!(order, expected_order, "case {case}: order");
        let sorted: Vec<[i32; 4]> = order.iter().map(|&i| expanded[i]).collect();
        assert_eq!(sorted, boxes_i32(&get("expanded")?.values), "case {case}: boxes");

        let expected_roll = get("roll")?.values;
        for (k, &i) in order.iter().enumerate() {
            let p = &landmarks[i * 10..i * 10 + 10];
            let five = [0, 1, 2, 3, 4].map(|j| [p[2 * j] as f32, p[2 * j + 1] as f32]);
            let roll = roll_score(&five);
            assert!(
                (roll - expected_roll[k]).abs() < 1e-12,
                "case {case} face {k}: roll {roll} vs {}",
                expected_roll[k]
            );
        }
    }
    Ok(())
}

#[test]
fn identity_ranking_matches_easyphoto() -> anyhow::Result<()> {
    let fx = Fixture::open("geometry.safetensors")?;
    let embeddings: Vec<Vec<f32>> = fx.get("rank.embeddings")?.f32s().chunks_exact(512).map(<[f32]>::to_vec).collect();
    let angles = fx.get("rank.angles")?.values;
    let ranking = rank_photos(&embeddings, &angles, TRAINING_PHOTOS)?;

    // numpy's sgemm sums in another order: f32 rounding only.
    let expected_scores = fx.get("rank.id_scores")?.f32s();
    let max_err = ranking.id_scores.iter().zip(&expected_scores).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_err < 1e-6, "id scores differ by {max_err}");
    assert_eq!(ranking.reference, fx.get("rank.reference")?.values[0] as usize);
    let expected_top: Vec<usize> = fx.get("rank.top15")?.values.iter().map(|&i| i as usize).collect();
    assert_eq!(ranking.selected, expected_top);
    assert_eq!(ranking.selected.len(), 15);

    assert!(rank_photos(&[], &[], 15).is_err());
    assert!(rank_photos(&embeddings[..2], &angles[..1], 15).is_err());
    Ok(())
}

#[test]
fn training_image_matches_easyphoto() -> anyhow::Result<()> {
    let fx = Fixture::open("geometry.safetensors")?;
    let crop_t = fx.get("train.crop")?;
    let (h, w) = (crop_t.shape[0] as u32, crop_t.shape[1] as u32);
    let crop_img = RgbImage::from_raw(w, h, crop_t.u8s()).unwrap();
    let saliency = GrayImage::from_raw(w, h, fx.get("train.saliency")?.u8s()).unwrap();
    let face = boxes_i32(&fx.get("train.ratio1_box")?.values)[0];
    assert_eq!(training_box(face, w, h), boxes_i32(&fx.get("train.box")?.values)[0]);

    let mask = training_mask(&saliency, face);
    let out = on_white(&crop_img, &mask)?.expect("non-empty mask");
    assert_eq!(out.as_raw(), &fx.get("train.image")?.u8s(), "training image");

    let empty = GrayImage::new(w, h);
    assert!(on_white(&crop_img, &empty)?.is_none(), "an empty mask drops the photo");
    Ok(())
}

#[test]
fn tiny_images_clip_as_numpy_does() {
    // np.clip(v, 1, w - 1) with w = 1 gives 0 (the upper bound wins); np.clip(v, 0, -1) gives -1.
    assert_eq!(training_box([0, 0, 1, 1], 1, 1), [0, 0, 0, 0]);
    assert_eq!(expand_box([0.0, 0.0, 1.0, 1.0], 3.0, 0, 0), [-1, -1, -1, -1]);
    // A NaN coordinate (numpy's int cast of NaN is undefined) must not panic.
    let _ = expand_box([f64::NAN, 2.0, 5.0, 6.0], 1.0, 10, 10);
}

#[test]
fn crop_is_pil_crop() {
    let img = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let c = crop(&img, [2, 1, 5, 3]);
    assert_eq!(c.dimensions(), (3, 2));
    assert_eq!(c.get_pixel(0, 0).0, [2, 1, 7]);
    assert_eq!(c.get_pixel(2, 1).0, [4, 2, 7]);
    let outside = crop(&img, [4, 2, 8, 5]);
    assert_eq!(outside.dimensions(), (4, 3));
    assert_eq!(outside.get_pixel(3, 2).0, [0, 0, 0], "PIL fills outside the image with black");
}
