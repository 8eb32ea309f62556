//! 8-bit L*a*b* conversions and EasyPhoto's colour shift against OpenCV 5.0 / numpy
//! (`tools/reference/face_image_color.py`): every value must be identical.

mod fixture_io;

use easyphoto_face::color::{color_shift, color_transfer, lab_to_rgb, rgb_to_lab};
use easyphoto_face::morphology::{Plane, box_blur};
use fixture_io::Fixture;
use image::{GrayImage, Luma, RgbImage};

fn rgb(fx: &Fixture, name: &str) -> anyhow::Result<RgbImage> {
    let t = fx.get(name)?;
    let (h, w) = if t.shape.len() == 3 { (t.shape[0], t.shape[1]) } else { (1, t.shape[0]) };
    Ok(RgbImage::from_raw(w as u32, h as u32, t.u8s()).expect("shape"))
}

/// (number of differing samples, largest difference).
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y));
    (d.clone().filter(|&v| v > 0).count(), d.max().unwrap_or(0))
}

/// The RGB triples of the fixture's colour cube: components 0, 7, ..., 252, 255, red slowest.
fn cube() -> RgbImage {
    let levels: Vec<u8> = (0..=252).step_by(7).chain([255]).collect();
    let n = levels.len();
    RgbImage::from_fn((n * n * n) as u32, 1, |i, _| {
        let i = i as usize;
        image::Rgb([levels[i / (n * n)], levels[i / n % n], levels[i % n]])
    })
}

#[test]
fn lab_conversions_are_bit_exact_on_a_colour_cube() -> anyhow::Result<()> {
    let fx = Fixture::open("color.safetensors")?;
    let colours = cube();
    assert_eq!(diff(&rgb_to_lab(&colours), &rgb(&fx, "cube.lab")?), (0, 0), "RGB2LAB");
    assert_eq!(diff(&lab_to_rgb(&colours), &rgb(&fx, "cube.rgb")?), (0, 0), "LAB2RGB");
    Ok(())
}

#[test]
fn lab_conversions_are_bit_exact_on_a_photo() -> anyhow::Result<()> {
    let fx = Fixture::open("color.safetensors")?;
    let lab = rgb_to_lab(&rgb(&fx, "src")?);
    assert_eq!(diff(&lab, &rgb(&fx, "src.lab")?), (0, 0), "RGB2LAB");
    assert_eq!(diff(&lab_to_rgb(&lab), &rgb(&fx, "src.back")?), (0, 0), "LAB2RGB");
    Ok(())
}

#[test]
fn color_transfer_and_shift_match_easyphoto() -> anyhow::Result<()> {
    let fx = Fixture::open("color.safetensors")?;
    let (src, reference) = (rgb(&fx, "src")?, rgb(&fx, "ref")?);
    let transfer = color_transfer(&src, &reference)?;
    assert_eq!(diff(&transfer, &rgb(&fx, "transfer")?), (0, 0), "color_transfer");

    let mask_t = fx.get("mask")?;
    let mask = GrayImage::from_raw(mask_t.shape[1] as u32, mask_t.shape[0] as u32, mask_t.u8s()).expect("shape");
    let blurred = box_blur(
        &Plane::<f32>::from_fn(mask.width(), mask.height(), |x, y| Luma([f32::from(mask[(x, y)][0])])),
        32,
        32,
    )?;
    let weights = Plane::<f32>::from_fn(mask.width(), mask.height(), |x, y| Luma([blurred[(x, y)][0] / 255.0]));
    assert_eq!(diff(&color_shift(&src, &reference, &weights)?, &rgb(&fx, "shift")?), (0, 0), "color_shift");

    assert!(color_transfer(&RgbImage::new(0, 3), &reference).is_err());
    Ok(())
}
