//! Classical face fusion against the same chain in scikit-image/OpenCV/numpy
//! (`tools/reference/face_image_fusion.py`), and its behaviour: untouched outside the mask, the
//! template at ratio 0, the aligned colour-matched user face at ratio 1.

mod fixture_io;

use easyphoto_face::fusion::{
    ClassicalFusion, FaceFusion, FusionParams, FusionRegions, crop_and_paste, fuse_faces, fusion_blend,
    landmark_face_mask,
};
use easyphoto_face::geometry::expand_box;
use easyphoto_face::masks::{box_mask, contour_mask, inpaint_face_mask};
use easyphoto_face::{Face, load_rgb};
use fixture_io::{Fixture, test_path};
use image::{GrayImage, RgbImage};

struct Case {
    template: RgbImage,
    template_landmarks: [[f32; 2]; 5],
    user: RgbImage,
    user_landmarks: [[f32; 2]; 5],
    mask: GrayImage,
    fx: Fixture,
}

fn landmarks(fx: &Fixture, name: &str) -> anyhow::Result<[[f32; 2]; 5]> {
    let v = fx.get(name)?.f32s();
    Ok(std::array::from_fn(|i| [v[2 * i], v[2 * i + 1]]))
}

fn rgb(fx: &Fixture, name: &str) -> anyhow::Result<RgbImage> {
    let t = fx.get(name)?;
    Ok(RgbImage::from_raw(t.shape[1] as u32, t.shape[0] as u32, t.u8s()).expect("shape"))
}

fn gray(fx: &Fixture, name: &str) -> anyhow::Result<GrayImage> {
    let t = fx.get(name)?;
    Ok(GrayImage::from_raw(t.shape[1] as u32, t.shape[0] as u32, t.u8s()).expect("shape"))
}

fn case() -> anyhow::Result<Case> {
    let fx = Fixture::open("fusion.safetensors")?;
    Ok(Case {
        template: rgb(&fx, "template")?,
        template_landmarks: landmarks(&fx, "template_landmarks")?,
        user: load_rgb(test_path("assets/astronaut.png"))?,
        user_landmarks: landmarks(&fx, "user_landmarks")?,
        mask: gray(&fx, "mask")?,
        fx,
    })
}

fn fuse(c: &Case, ratio: f32) -> anyhow::Result<RgbImage> {
    let params = FusionParams { ratio, feather: 4, color_match: true };
    Ok(fuse_faces(&c.template, &c.template_landmarks, &c.user, &c.user_landmarks, &c.mask, &params)?)
}

/// (number of differing samples, largest difference).
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8) {
    let d = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y));
    (d.clone().filter(|&v| v > 0).count(), d.max().unwrap_or(0))
}

#[test]
fn landmark_mask_matches_numpy() -> anyhow::Result<()> {
    let c = case()?;
    let ours = landmark_face_mask(c.template.width(), c.template.height(), &c.template_landmarks);
    assert_eq!(ours.as_raw(), c.mask.as_raw());
    Ok(())
}

#[test]
fn fusion_matches_the_opencv_chain() -> anyhow::Result<()> {
    let c = case()?;
    for (ratio, name) in [(0.6, "fused_6"), (1.0, "fused_10")] {
        let (count, max) = diff(&fuse(&c, ratio)?, &rgb(&c.fx, name)?);
        eprintln!("{name}: {count} samples differ from the reference, max {max}");
        // Identical but for the similarity estimate (closed form vs scikit-image's SVD), whose
        // last-bit differences can move a bilinear sample across a rounding boundary.
        assert!(max <= 1 && count <= 20, "{name}: {count} samples differ, by up to {max}");
    }
    Ok(())
}

#[test]
fn fusion_leaves_the_outside_alone_and_follows_the_ratio() -> anyhow::Result<()> {
    let c = case()?;
    let region = gray(&c.fx, "region")?;
    let warped_matched = rgb(&c.fx, "warped_matched")?;

    let half = fuse(&c, 0.6)?;
    for (x, y, m) in c.mask.enumerate_pixels() {
        if m[0] == 0 {
            assert_eq!(half.get_pixel(x, y), c.template.get_pixel(x, y), "outside the mask at ({x}, {y})");
        }
    }
    assert_eq!(fuse(&c, 0.0)?.as_raw(), c.template.as_raw(), "ratio 0 returns the template");

    // Ratio 1: where the mask is full 5 pixels around (erosion by 4 then a radius-4 blur), the
    // result is the aligned, colour-matched user face.
    let full = fuse(&c, 1.0)?;
    let inner = easyphoto_face::morphology::erode(&region, 17, 17);
    let mut checked = 0;
    for (x, y, m) in inner.enumerate_pixels() {
        if m[0] == 255 {
            let (ours, reference) = (full.get_pixel(x, y).0, warped_matched.get_pixel(x, y).0);
            assert!(
                ours.iter().zip(reference).all(|(a, b)| a.abs_diff(b) <= 1),
                "({x}, {y}): {ours:?} vs {reference:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} interior pixels");
    assert!(fuse(&c, 1.5).is_err());
    Ok(())
}

#[test]
fn classical_fusion_through_the_trait() -> anyhow::Result<()> {
    let c = case()?;
    let face = |landmarks: [[f32; 2]; 5]| Face { bbox: [0.0; 4], score: 1.0, landmarks };
    let fusion: Box<dyn FaceFusion> =
        Box::new(ClassicalFusion { params: FusionParams { ratio: 0.6, ..Default::default() } });
    let out = fusion.fuse(&c.template, &face(c.template_landmarks), &c.user, &face(c.user_landmarks))?;
    assert_eq!(out.as_raw(), fuse(&c, 0.6)?.as_raw());
    Ok(())
}

#[test]
fn easyphoto_fusion_blend_matches_numpy() -> anyhow::Result<()> {
    let c = case()?;
    let (fusion_face, fusion_eyes, input_lips) =
        (gray(&c.fx, "blend.fusion_face")?, gray(&c.fx, "blend.fusion_eyes")?, gray(&c.fx, "blend.input_lips")?);
    let regions = FusionRegions {
        fusion_face: &fusion_face,
        input_face: &c.mask,
        fusion_eyes: &fusion_eyes,
        input_lips: &input_lips,
    };
    let out = fusion_blend(&rgb(&c.fx, "fused_6")?, &c.template, &regions, 0.6)?;
    let (count, max) = diff(&out, &rgb(&c.fx, "blend.out")?);
    eprintln!("fusion_blend: {count} samples differ from numpy, max {max}");
    // f64 throughout; only the running-sum order of the box blur differs from OpenCV's.
    assert!(max <= 1 && count <= 10, "{count} samples differ, by up to {max}");
    Ok(())
}

#[test]
fn easyphoto_mask_recipes_match_opencv() -> anyhow::Result<()> {
    let c = case()?;
    assert_eq!(inpaint_face_mask(&c.mask, 73).as_raw(), gray(&c.fx, "recipe.inpaint")?.as_raw());
    let (eyes, lips) = (gray(&c.fx, "blend.fusion_eyes")?, gray(&c.fx, "blend.input_lips")?);
    let eyes_lips =
        GrayImage::from_fn(eyes.width(), eyes.height(), |x, y| image::Luma([eyes[(x, y)][0].max(lips[(x, y)][0])]));
    assert_eq!(contour_mask(&c.mask, &eyes_lips)?.as_raw(), gray(&c.fx, "recipe.contour")?.as_raw());
    Ok(())
}

#[test]
fn crop_and_paste_matches_easyphoto() -> anyhow::Result<()> {
    let c = case()?;
    let d = c.fx.get("paste.detection")?.values;
    let source_box = expand_box([d[0], d[1], d[2], d[3]], 1.5, c.user.width(), c.user.height());
    let expected_box = c.fx.get("paste.source_box")?.values;
    assert_eq!(source_box.map(f64::from), [expected_box[0], expected_box[1], expected_box[2], expected_box[3]]);
    let mask = box_mask(c.user.width(), c.user.height(), source_box);
    let out = crop_and_paste(&c.user, &mask, &c.template, &c.user_landmarks, &c.template_landmarks, source_box)?;
    let (count, max) = diff(&out, &rgb(&c.fx, "paste.out")?);
    eprintln!("crop_and_paste: {count} samples differ from EasyPhoto's, max {max}");
    // As for fuse_faces: the similarity estimate's last bits can move a bilinear sample by one level.
    assert!(max <= 1 && count <= 20, "{count} samples differ, by up to {max}");
    Ok(())
}
