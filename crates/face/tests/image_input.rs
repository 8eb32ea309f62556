//! Image input: files from `tools/reference/face_image_inputs.py`, decoded as EasyPhoto's
//! `ImageOps.exif_transpose(Image.open(f)).convert("RGB")` does (fixture `image_inputs.safetensors`).

mod fixture_io;

use easyphoto_face::{DecodeLimits, FaceError, decode_rgb, load_rgb, load_rgb_with};
use fixture_io::{Fixture, test_path};
use image::{ImageBuffer, ImageEncoder, Rgb, RgbImage};

fn image_file(name: &str) -> std::path::PathBuf {
    test_path(&format!("assets/images/{name}"))
}

/// Largest per-sample difference between a decoded image and the fixture's expectation.
fn max_diff_to_expected(fixture: &Fixture, name: &str, img: &RgbImage) -> anyhow::Result<u8> {
    let expected = fixture.get(name)?;
    assert_eq!(expected.shape, [img.height() as usize, img.width() as usize, 3], "{name}: shape (h, w, c)");
    Ok(img.as_raw().iter().zip(expected.u8s()).map(|(&a, b)| a.abs_diff(b)).max().unwrap_or(0))
}

#[test]
fn lossless_inputs_match_pillow_exactly() -> anyhow::Result<()> {
    let fixture = Fixture::open("image_inputs.safetensors")?;
    // Grey replicated, alpha dropped (not composited), eXIf orientation in a PNG applied, 16-bit scaled.
    for name in ["grey.png", "grey_alpha.png", "rgba.png", "exif_orientation_5.png", "grey16.png"] {
        let img = load_rgb(image_file(name))?;
        assert_eq!(max_diff_to_expected(&fixture, name, &img)?, 0, "{name}");
    }
    Ok(())
}

#[test]
fn bmp_and_tiff_inputs_match_pillow_exactly() -> anyhow::Result<()> {
    let fixture = Fixture::open("image_inputs.safetensors")?;
    // 24-bit and 8-bit palette BMP; LZW RGB, RGBA (alpha dropped) and 16-bit grey (scaled) TIFF.
    for name in ["rgb.bmp", "grey.bmp", "rgb_lzw.tif", "rgba.tif", "grey16.tif"] {
        let img = load_rgb(image_file(name))?;
        assert_eq!(max_diff_to_expected(&fixture, name, &img)?, 0, "{name}");
    }
    Ok(())
}

#[test]
fn exif_rotated_jpegs_match_pillow() -> anyhow::Result<()> {
    let fixture = Fixture::open("image_inputs.safetensors")?;
    for name in ["exif_orientation_3.jpg", "exif_orientation_6.jpg", "exif_orientation_8.jpg"] {
        let img = load_rgb(image_file(name))?;
        // zune-jpeg and libjpeg differ by up to 2 levels here (IDCT and chroma upsampling); a wrong
        // orientation would put cells 60+ levels apart.
        let diff = max_diff_to_expected(&fixture, name, &img)?;
        eprintln!("{name}: max difference to Pillow {diff}");
        assert!(diff <= 4, "{name}: max diff {diff}");
    }
    Ok(())
}

#[test]
fn sixteen_bit_rgb_is_scaled_to_eight_bits() -> anyhow::Result<()> {
    let rgb16 = ImageBuffer::<Rgb<u16>, _>::from_fn(5, 3, |x, y| Rgb([x as u16 * 16000, y as u16 * 30000, 65535]));
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        bytemuck_u16(rgb16.as_raw()).as_slice(),
        5,
        3,
        image::ExtendedColorType::Rgb16,
    )?;
    let img = decode_rgb(&png, "rgb16.png", &DecodeLimits::default())?;
    for (x, y, p) in img.enumerate_pixels() {
        let expected = [x * 16000, y * 30000, 65535].map(|v| ((f64::from(v) * 255.0 / 65535.0).round()) as u8);
        assert_eq!(p.0, expected, "pixel ({x}, {y})");
    }
    Ok(())
}

/// Native-endian bytes of u16 samples, as `ImageEncoder::write_image` takes them.
fn bytemuck_u16(samples: &[u16]) -> Vec<u8> {
    samples.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// Whether an error is the expected variant.
type IsExpected = fn(&FaceError) -> bool;

#[test]
fn bad_files_give_typed_errors_naming_the_file() {
    let cases: [(&str, IsExpected); 7] = [
        ("empty.png", |e| matches!(e, FaceError::EmptyImage { .. })),
        ("truncated.png", |e| matches!(e, FaceError::ImageDecode { .. })),
        ("truncated.bmp", |e| matches!(e, FaceError::ImageDecode { .. })),
        ("truncated.tif", |e| matches!(e, FaceError::ImageDecode { .. })),
        ("not_an_image.png", |e| matches!(e, FaceError::UnsupportedImage { .. })),
        ("unsupported.gif", |e| matches!(e, FaceError::UnsupportedImage { .. })),
        ("missing.png", |e| matches!(e, FaceError::ImageRead { .. })),
    ];
    for (name, is_expected) in cases {
        let err = load_rgb(image_file(name)).expect_err(name);
        assert!(is_expected(&err), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{name}: message `{err}` does not name the file");
    }
}

#[test]
fn pixel_limit_is_checked_from_the_header() {
    // bomb.png declares 100000 x 100000 pixels in 69 bytes.
    let err = load_rgb(image_file("bomb.png")).expect_err("bomb");
    match err {
        FaceError::ImageTooLarge { width: 100_000, height: 100_000, max_pixels, .. } => {
            assert_eq!(max_pixels, DecodeLimits::default().max_pixels)
        }
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    // A configurable limit: the 24 x 16 grey image passes at 384 pixels and fails at 383.
    let path = image_file("grey.png");
    assert!(load_rgb_with(&path, &DecodeLimits { max_pixels: 384 }).is_ok());
    assert!(matches!(
        load_rgb_with(&path, &DecodeLimits { max_pixels: 383 }),
        Err(FaceError::ImageTooLarge { width: 24, height: 16, max_pixels: 383, .. })
    ));
}
