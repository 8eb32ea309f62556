//! The WebUI's final inpainting composite against AUTOMATIC1111's own calls (cv2.GaussianBlur,
//! PIL paste + alpha_composite), fixtures from `tools/reference/inpaint_overlay.py`.

use std::path::PathBuf;

use easyphoto_diffusion::DiffusionError;
use easyphoto_diffusion::inpaint_overlay::{apply_overlay, blur_mask, composite_inpaint, overlay_mask};
use image::{GrayImage, RgbImage};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inpaint_overlay").join(name)
}

fn gray(name: &str) -> GrayImage {
    image::open(fixture(name)).unwrap().into_luma8()
}

fn rgb(name: &str) -> RgbImage {
    image::open(fixture(name)).unwrap().into_rgb8()
}

#[test]
fn composite_matches_the_webui() {
    for case in ["case_a", "case_b"] {
        let blur: f64 = std::fs::read_to_string(fixture(&format!("{case}_blur.txt"))).unwrap().trim().parse().unwrap();
        let mask = gray(&format!("{case}_mask.png"));

        // OpenCV's fixed-point Gaussian is reproduced bit for bit.
        assert_eq!(blur_mask(&mask, blur), gray(&format!("{case}_blurred.png")), "{case}: blurred mask");
        let overlay = overlay_mask(&mask, blur);
        assert_eq!(overlay, gray(&format!("{case}_overlay.png")), "{case}: mask_for_overlay");

        let (generated, original) = (rgb(&format!("{case}_generated.png")), rgb(&format!("{case}_original.png")));
        let ours = composite_inpaint(&generated, &original, &mask, blur).unwrap();
        assert_eq!(ours, rgb(&format!("{case}_expected.png")), "{case}: composite");

        // Outside the blurred mask the original comes back exactly; at its core the generation.
        for (x, y, m) in overlay.enumerate_pixels() {
            if m.0[0] == 0 {
                assert_eq!(ours.get_pixel(x, y), original.get_pixel(x, y), "{case}: ({x}, {y})");
            } else if m.0[0] == 255 {
                assert_eq!(ours.get_pixel(x, y), generated.get_pixel(x, y), "{case}: ({x}, {y})");
            }
        }
    }
}

#[test]
fn zero_blur_keeps_the_mask() {
    let mask = gray("case_a_mask.png");
    assert_eq!(blur_mask(&mask, 0.0), mask);
}

#[test]
fn mismatched_sizes_are_a_typed_error() {
    let generated = RgbImage::new(8, 8);
    let err = apply_overlay(&generated, &RgbImage::new(8, 9), &GrayImage::new(8, 8)).unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("original is 8×9"), "{err}");
    let err = apply_overlay(&generated, &RgbImage::new(8, 8), &GrayImage::new(7, 8)).unwrap_err();
    assert!(err.to_string().contains("overlay mask is 7×8"), "{err}");
}
