//! Segmenters: U²-Net with rembg 2.0.86's pre/post-processing on a random model of U²-Net's
//! signature, Pillow-exact LANCZOS, and the embedded selfie model on a real photo. Fixture from
//! `tools/reference/face_segment.py`. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::resample::{PilFilter, resize_pil_u8};
use easyphoto_face::{FaceDetector, FaceError, HumanSelfie, Mtcnn, Segmenter, U2Net};
use image::{GrayImage, RgbImage};
use reference::{Fixture, asset, max_abs_diff_u8, photo};

/// PIL's `convert("L")`: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn pil_luma(img: &RgbImage) -> Vec<u8> {
    img.pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

#[test]
fn pil_resizes_match_pillow() -> anyhow::Result<()> {
    let fx = Fixture::open("segment.safetensors")?;
    let img = photo("astronaut.png")?;
    let crop = image::imageops::crop_imm(&img, 150, 100, 100, 80).to_image();
    let cases: [(&str, Vec<u8>); 5] = [
        ("pil.bilinear_rgb_up_170x130", resize_pil_u8(crop.as_raw(), (100, 80), 3, (170, 130), PilFilter::Bilinear)),
        ("pil.bilinear_rgb_200x150", resize_pil_u8(img.as_raw(), (512, 512), 3, (200, 150), PilFilter::Bilinear)),
        ("pil.lanczos_rgb_320", resize_pil_u8(img.as_raw(), (512, 512), 3, (320, 320), PilFilter::Lanczos)),
        ("pil.lanczos_rgb_up_170x130", resize_pil_u8(crop.as_raw(), (100, 80), 3, (170, 130), PilFilter::Lanczos)),
        ("pil.lanczos_l_97x131", resize_pil_u8(&pil_luma(&img), (512, 512), 1, (97, 131), PilFilter::Lanczos)),
    ];
    for (name, ours) in cases {
        let (err, n) = max_abs_diff_u8(&ours, &fx.u8s(name)?);
        println!("{name}: max abs error {err}, {n} values differ");
        assert_eq!(err, 0, "{name}");
    }
    Ok(())
}

#[test]
fn u2net_matches_rembg() -> anyhow::Result<()> {
    let fx = Fixture::open("segment.safetensors")?;
    let u2net = U2Net::load(asset("u2net_random.onnx"), 1)?;
    for (key, file) in [("astronaut", "astronaut.png"), ("faceapi_sample1", "faceapi_sample1_640.png")] {
        let img = photo(file)?;
        let mask = u2net.segment(&img)?;
        assert_eq!(mask.dimensions(), img.dimensions());
        let (err, n) = max_abs_diff_u8(mask.as_raw(), &fx.u8s(&format!("{key}.u2net_mask"))?);
        println!("{key}: mask max abs error {err}, {n} of {} values differ", mask.as_raw().len());
        assert_eq!(err, 0, "{key}: mask differs by {err}");
    }
    assert!(matches!(U2Net::load(asset("arcface_random.onnx"), 1), Err(FaceError::UnsupportedModel { .. })));
    Ok(())
}

#[test]
fn selfie_mask_covers_the_person_not_the_background() -> anyhow::Result<()> {
    let img = photo("astronaut.png")?;
    let mask: GrayImage = HumanSelfie::new(1)?.segment(&img)?;
    assert_eq!(mask.dimensions(), img.dimensions());
    let face = Mtcnn::new(1)?.detect_some(&img, "astronaut.png")?[0];
    let mean = |x0: u32, y0: u32, x1: u32, y1: u32| {
        let mut sum = 0u64;
        for y in y0..y1 {
            for x in x0..x1 {
                sum += u64::from(mask.get_pixel(x, y)[0]);
            }
        }
        sum as f64 / f64::from((x1 - x0) * (y1 - y0))
    };
    let [x1, y1, x2, y2] = face.bbox.map(|v| v as u32);
    let on_face = mean(x1, y1, x2, y2);
    // The top-right corner of the photo is the background (a flag and wall).
    let corner = mean(440, 0, 512, 60);
    println!("selfie mask: face box mean {on_face:.1}, top-right corner mean {corner:.1}");
    assert!(on_face > 200.0 && corner < 60.0, "face {on_face}, corner {corner}");
    Ok(())
}
