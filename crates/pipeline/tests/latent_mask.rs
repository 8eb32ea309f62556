//! The WebUI's latent mask against Pillow (tools/reference/pipeline_latent_mask.py): the bicubic
//! reduction of the blurred mask bit-exact, the rounded mask identical.

use std::path::PathBuf;

use candle_core::Device;
use easyphoto_pipeline::latent_mask::{latent_mask, resized_mask};
use image::GrayImage;

fn fixture(name: &str) -> GrayImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/latent_mask").join(name);
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_luma8()
}

#[test]
fn latent_masks_match_pillows_bicubic_reduction_and_numpys_rounding() {
    for case in ["face_512x768", "ring_200x136", "blobs_96x72"] {
        let blurred = fixture(&format!("{case}_blurred.png"));
        let expected = fixture(&format!("{case}_resized.png"));
        let resized = resized_mask(&blurred, 8).unwrap();
        assert_eq!(resized.dimensions(), expected.dimensions(), "{case}");
        let max_diff = resized.iter().zip(expected.iter()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert_eq!(max_diff, 0, "{case}: the bicubic reduction differs from Pillow's by up to {max_diff}");
        // Some values lie strictly between 0 and 255: the fixture exercises the rounding.
        assert!(expected.iter().any(|&v| v > 0 && v < 255), "{case}");

        let latmask = latent_mask(&blurred, 8, &Device::Cpu).unwrap();
        let (w, h) = expected.dimensions();
        assert_eq!(latmask.dims(), [1, 1, h as usize, w as usize]);
        let values = latmask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let numpy = fixture(&format!("{case}_latmask.png"));
        for (i, (v, n)) in values.iter().zip(numpy.iter()).enumerate() {
            assert_eq!(*v, f32::from(*n) / 255.0, "{case}: latent pixel {i}");
        }
    }
}

#[test]
fn a_mask_off_the_latent_grid_is_a_typed_error() {
    let err = resized_mask(&GrayImage::new(100, 64), 8).unwrap_err();
    assert!(err.to_string().contains("100×64"), "{err}");
}
