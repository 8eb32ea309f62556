//! Canny, `cv2.resize`, the colour map and `tile_resample` against OpenCV on real photos, with
//! fixtures from `tools/reference/controlnet_preproc_images.py`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use easyphoto_controlnet::preprocess::{
    Interpolation, PreprocessError, annotate_canny, annotate_canny_webui, canny, color_map, resize, tile_resample,
};
use image::{DynamicImage, GrayImage, ImageBuffer, Pixel, RgbImage};

fn asset(name: &str) -> Result<DynamicImage> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/assets").join(name);
    image::open(&path).with_context(|| path.display().to_string())
}

fn fixture(name: &str) -> Result<DynamicImage> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess").join(name);
    image::open(&path).with_context(|| path.display().to_string())
}

fn rgb(name: &str) -> Result<RgbImage> {
    Ok(asset(name)?.to_rgb8())
}

/// astronaut mirrored to 1300×1100 (`np.pad(mode="symmetric")`): a PNG-exact input whose short side
/// exceeds 1024, for the area paths (JPEG decoders disagree by a level here and there).
fn mosaic() -> Result<RgbImage> {
    let astronaut = rgb("astronaut.png")?;
    let (w, h) = astronaut.dimensions();
    let mirror = |i: u32, n: u32| if i % (2 * n) < n { i % (2 * n) } else { 2 * n - 1 - i % (2 * n) };
    Ok(RgbImage::from_fn(1300, 1100, |x, y| *astronaut.get_pixel(mirror(x, w), mirror(y, h))))
}

/// Fraction of equal pixels of two edge maps of the same size.
fn agreement(ours: &GrayImage, expected: &GrayImage) -> f64 {
    assert_eq!(ours.dimensions(), expected.dimensions());
    let same = ours.as_raw().iter().zip(expected.as_raw()).filter(|(a, b)| a == b).count();
    same as f64 / ours.as_raw().len() as f64
}

/// Largest absolute difference of two 8-bit images of the same size and layout.
fn max_abs<P: Pixel<Subpixel = u8>>(ours: &ImageBuffer<P, Vec<u8>>, expected: &ImageBuffer<P, Vec<u8>>) -> u8 {
    assert_eq!(ours.dimensions(), expected.dimensions());
    ours.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0)
}

/// The bar for canny: at least 99.5% of pixels equal to `cv2.Canny`.
const CANNY_AGREEMENT: f64 = 0.995;
/// The bar for resizes: within 2 levels of OpenCV. Lanczos-4, area and nearest are exact;
/// bicubic follows IPP (OpenCV's float path rounded) and differs by 1 in ~0.01% of values
/// (float summation order).
const RESIZE_LEVELS: u8 = 2;

#[test]
fn canny_matches_opencv_on_photos() -> Result<()> {
    // faceapi1 is a JPEG: its agreement also absorbs the decoders' differences.
    let cases: [(&str, &str, GrayImage); 3] = [
        ("astronaut", "canny_astronaut.png", canny(&rgb("astronaut.png")?, 100.0, 200.0)),
        ("camera (grey)", "canny_camera.png", canny(&asset("camera.png")?.to_luma8(), 100.0, 200.0)),
        ("faceapi1", "canny_faceapi1.png", canny(&rgb("faceapi_sample1.jpg")?, 100.0, 200.0)),
    ];
    for (name, expected, ours) in cases {
        let agree = agreement(&ours, &fixture(expected)?.to_luma8());
        println!("canny {name}: {:.5} of pixels equal to cv2.Canny", agree);
        assert!(agree >= CANNY_AGREEMENT, "canny {name}: {agree}");
    }
    Ok(())
}

#[test]
fn annotator_canny_matches_controlnet_aux() -> Result<()> {
    for (photo, expected) in [
        ("astronaut.png", "annotator_canny_astronaut.png"),
        ("camera.png", "annotator_canny_camera.png"),
        ("faceapi_sample1.jpg", "annotator_canny_faceapi1.png"),
    ] {
        let ours = annotate_canny(&rgb(photo)?, 100.0, 200.0, 512)?;
        let agree = agreement(&ours, &fixture(expected)?.to_luma8());
        println!("annotate_canny {photo}: {:.5} of pixels equal to controlnet_aux", agree);
        assert!(agree >= CANNY_AGREEMENT, "annotate_canny {photo}: {agree}");
    }
    Ok(())
}

#[test]
fn webui_canny_matches_sd_webui_controlnet() -> Result<()> {
    let astronaut = rgb("astronaut.png")?;
    let camera = rgb("camera.png")?;
    let mosaic = mosaic()?;
    let cases = [
        (&astronaut, "astronaut", 512, "webui_canny_astronaut.png"),
        (&astronaut, "astronaut", 300, "webui_canny_astronaut_300.png"),
        (&astronaut, "astronaut", 700, "webui_canny_astronaut_700.png"),
        (&camera, "camera", 512, "webui_canny_camera.png"),
        (&camera, "camera", 300, "webui_canny_camera_300.png"),
        (&mosaic, "mosaic", 512, "webui_canny_mosaic.png"),
        (&mosaic, "mosaic", 300, "webui_canny_mosaic_300.png"),
    ];
    for (image, name, resolution, expected) in cases {
        let ours = annotate_canny_webui(image, 100.0, 200.0, resolution)?;
        let agree = agreement(&ours, &fixture(expected)?.to_luma8());
        println!("annotate_canny_webui {name} at {resolution}: {agree:.5} of pixels equal");
        assert!(agree >= CANNY_AGREEMENT, "annotate_canny_webui {name} {resolution}: {agree}");
    }
    Ok(())
}

#[test]
fn resize_matches_opencv() -> Result<()> {
    let cases = [
        ("astronaut", Interpolation::Cubic, "cubic", 300, 200),
        ("astronaut", Interpolation::Nearest, "nearest", 123, 456),
        ("astronaut", Interpolation::Area, "area", 301, 200),
        ("astronaut", Interpolation::Area, "area", 256, 256),
        ("astronaut", Interpolation::Area, "area", 128, 171),
        ("camera", Interpolation::Cubic, "cubic", 600, 560),
        ("camera", Interpolation::Cubic, "cubic", 97, 61),
        ("camera", Interpolation::Lanczos4, "lanczos4", 555, 520),
        ("camera", Interpolation::Lanczos4, "lanczos4", 200, 150),
        ("camera", Interpolation::Nearest, "nearest", 640, 600),
        ("camera", Interpolation::Area, "area", 540, 300),
        ("camera", Interpolation::Area, "area", 170, 170),
        ("mosaic", Interpolation::Area, "area", 480, 406),
        ("mosaic", Interpolation::Cubic, "cubic", 333, 222),
    ];
    for (photo, interpolation, tag, w, h) in cases {
        let expected = fixture(&format!("resize_{photo}_{tag}_{w}x{h}.png"))?;
        let err = match photo {
            "camera" => max_abs(&resize(&asset("camera.png")?.to_luma8(), w, h, interpolation)?, &expected.to_luma8()),
            "astronaut" => max_abs(&resize(&rgb("astronaut.png")?, w, h, interpolation)?, &expected.to_rgb8()),
            _ => max_abs(&resize(&mosaic()?, w, h, interpolation)?, &expected.to_rgb8()),
        };
        println!("resize {photo} {tag} {w}x{h}: max abs {err}");
        assert!(err <= RESIZE_LEVELS, "resize {photo} {tag} {w}x{h}: max abs {err}");
    }
    Ok(())
}

#[test]
fn color_map_matches_easyphoto_chain() -> Result<()> {
    let astronaut = rgb("astronaut.png")?;
    let mosaic = mosaic()?;
    for (image, tag, ratio) in
        [(&astronaut, "astronaut", 1.0), (&astronaut, "astronaut", 24.0), (&mosaic, "mosaic", 24.0)]
    {
        let ours = color_map(image, ratio)?;
        let err = max_abs(&ours, &fixture(&format!("color_{tag}_r{ratio}.png"))?.to_rgb8());
        println!("color_map {tag} blur_ratio {ratio}: max abs {err}");
        assert!(err <= RESIZE_LEVELS, "color_map {tag} {ratio}: max abs {err}");
    }
    Ok(())
}

#[test]
fn tile_resample_matches_webui() -> Result<()> {
    let astronaut = rgb("astronaut.png")?;
    assert_eq!(tile_resample(&astronaut, 1.0)?, astronaut, "rate 1 is the identity");
    let mosaic = mosaic()?;
    for (image, tag, rate) in [(&astronaut, "astronaut", 2.0), (&mosaic, "mosaic", 4.0)] {
        let ours = tile_resample(image, rate)?;
        let err = max_abs(&ours, &fixture(&format!("tile_{tag}_r{rate}.png"))?.to_rgb8());
        println!("tile_resample {tag} rate {rate}: max abs {err}");
        assert!(err <= RESIZE_LEVELS, "tile_resample {tag} {rate}: max abs {err}");
    }
    Ok(())
}

#[test]
fn bad_parameters_are_typed_errors() -> Result<()> {
    let image = RgbImage::new(10, 10);
    assert!(matches!(resize(&image, 0, 5, Interpolation::Cubic), Err(PreprocessError::EmptySize { .. })));
    assert!(matches!(color_map(&image, 0.0), Err(PreprocessError::InvalidParameter { name: "blur_ratio", .. })));
    assert!(matches!(color_map(&image, 2000.0), Err(PreprocessError::EmptySize { .. })));
    assert!(matches!(tile_resample(&image, f64::NAN), Err(PreprocessError::InvalidParameter { name: "rate", .. })));
    assert_eq!(canny(&GrayImage::new(0, 0), 100.0, 200.0).dimensions(), (0, 0));
    Ok(())
}

#[test]
fn tiny_images_do_not_panic() -> Result<()> {
    let dot = RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 90]));
    assert_eq!(canny(&dot, 100.0, 200.0).dimensions(), (1, 1));
    assert_eq!(canny(&GrayImage::from_fn(7, 1, |x, _| image::Luma([(x * 40) as u8])), 10.0, 20.0).dimensions(), (7, 1));
    for interpolation in [Interpolation::Nearest, Interpolation::Cubic, Interpolation::Lanczos4, Interpolation::Area] {
        let grown = resize(&dot, 5, 3, interpolation)?;
        assert!(grown.pixels().all(|p| p.0 == [200, 10, 90]), "{interpolation:?} of a constant image");
        assert_eq!(resize(&grown, 1, 1, interpolation)?.dimensions(), (1, 1));
    }
    assert_eq!(tile_resample(&RgbImage::new(3, 3), 2.0)?.dimensions(), (1, 1));
    assert_eq!(color_map(&dot, 1.0)?.dimensions(), (1, 1));
    Ok(())
}
