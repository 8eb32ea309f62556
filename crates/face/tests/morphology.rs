//! Morphology, box blur and paste-back against OpenCV 5.0 on real masks
//! (`tools/reference/face_image_morphology.py`): u8 results must be identical.

mod fixture_io;

use easyphoto_face::masks::{blend, box_mask, paste};
use easyphoto_face::morphology::{Plane, box_blur, close, dilate, erode};
use fixture_io::Fixture;
use image::{GrayImage, Luma, RgbImage};

fn plane(fx: &Fixture, name: &str) -> anyhow::Result<GrayImage> {
    let t = fx.get(name)?;
    Ok(GrayImage::from_raw(t.shape[1] as u32, t.shape[0] as u32, t.u8s()).expect("shape"))
}

fn rgb(fx: &Fixture, name: &str) -> anyhow::Result<RgbImage> {
    let t = fx.get(name)?;
    Ok(RgbImage::from_raw(t.shape[1] as u32, t.shape[0] as u32, t.u8s()).expect("shape"))
}

fn count_diff(a: &GrayImage, b: &GrayImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count()
}

#[test]
fn dilate_erode_close_match_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("morphology.safetensors")?;
    for name in ["person", "box"] {
        let m = plane(&fx, &format!("{name}.mask"))?;
        let cases: Vec<(&str, GrayImage)> = vec![
            ("dilate8", dilate(&m, 8, 8)),
            ("dilate16", dilate(&m, 16, 16)),
            ("erode8", erode(&m, 8, 8)),
            ("erode16", erode(&m, 16, 16)),
            ("dilate0", dilate(&m, 0, 0)),
            ("dilate5x3", dilate(&m, 5, 3)),
            ("erode5x3", erode(&m, 5, 3)),
            ("close7", close(&m, 7, 7)),
            ("close12", close(&m, 12, 12)),
            ("fusion_chain", erode(&dilate(&m, 8, 8), 16, 16)),
        ];
        for (op, ours) in cases {
            let expected = plane(&fx, &format!("{name}.{op}"))?;
            assert_eq!(count_diff(&ours, &expected), 0, "{name}.{op}");
        }
    }
    Ok(())
}

#[test]
fn box_blur_matches_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("morphology.safetensors")?;
    for name in ["person", "box"] {
        let m = plane(&fx, &format!("{name}.mask"))?;
        for (op, kw, kh) in [("blur_u8_8", 8, 8), ("blur_u8_32", 32, 32), ("blur_u8_5x3", 5, 3)] {
            let expected = plane(&fx, &format!("{name}.{op}"))?;
            assert_eq!(count_diff(&box_blur(&m, kw, kh)?, &expected), 0, "{name}.{op}");
        }
        // float32: OpenCV sums in f64 too; only the summation order differs.
        let mf = Plane::<f32>::from_fn(m.width(), m.height(), |x, y| Luma([f32::from(m[(x, y)][0])]));
        let ours = box_blur(&mf, 32, 32)?;
        let expected = fx.get(&format!("{name}.blur_f32_32"))?.f32s();
        let err = ours.as_raw().iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "{name}.blur_f32_32: max abs error {err}");
    }
    assert!(box_blur(&GrayImage::new(4, 4), 0, 3).is_err());
    Ok(())
}

#[test]
fn paste_back_through_blurred_box_matches_numpy() -> anyhow::Result<()> {
    let fx = Fixture::open("morphology.safetensors")?;
    let boxm = plane(&fx, "box.mask")?;
    let blurred = box_blur(
        &Plane::<f32>::from_fn(boxm.width(), boxm.height(), |x, y| Luma([f32::from(boxm[(x, y)][0])])),
        32,
        32,
    )?;
    let weights = Plane::<f32>::from_fn(boxm.width(), boxm.height(), |x, y| Luma([blurred[(x, y)][0] / 255.0]));
    let out = blend(&rgb(&fx, "paste.fg")?, &rgb(&fx, "paste.bg")?, &weights)?;
    let expected = rgb(&fx, "paste.out")?;
    let max = out.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    assert_eq!(max, 0, "blend");

    // Box mask and hard paste.
    assert_eq!(box_mask(120, 100, [71, 0, 120, 67]).as_raw(), boxm.as_raw());
    let mut dst = RgbImage::new(8, 6);
    let crop = RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7]));
    paste(&mut dst, &crop, 6, 5);
    assert_eq!(dst.get_pixel(7, 5).0, [9, 8, 7]);
    assert_eq!(dst.get_pixel(5, 5).0, [0, 0, 0]);
    assert_eq!(dst.pixels().filter(|p| p.0 == [9, 8, 7]).count(), 2, "clipped to the image");
    Ok(())
}
