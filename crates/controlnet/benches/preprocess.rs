//! Preprocessor timings on a 1024² photo (the centre crop of `tests/assets/faceapi_sample1.jpg`),
//! single-threaded. The OpenCV side: `tools/reference/controlnet_preproc_bench.py`.
//!
//! ```sh
//! cargo bench -p easyphoto-controlnet --bench preprocess
//! ```

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use easyphoto_controlnet::preprocess::{Interpolation, canny, color_map, resize};
use image::{DynamicImage, RgbImage};

fn photo() -> RgbImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/assets/faceapi_sample1.jpg");
    let image = image::open(&path).expect("test photo").to_rgb8();
    let (w, h) = image.dimensions();
    image::imageops::crop_imm(&image, (w - 1024) / 2, (h - 1024) / 2, 1024, 1024).to_image()
}

fn bench(c: &mut Criterion) {
    let rgb = photo();
    let grey = DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    c.bench_function("canny 1024x1024 rgb", |b| b.iter(|| canny(black_box(&rgb), 100.0, 200.0)));
    c.bench_function("canny 1024x1024 grey", |b| b.iter(|| canny(black_box(&grey), 100.0, 200.0)));
    c.bench_function("resize cubic 1024->512 rgb", |b| {
        b.iter(|| resize(black_box(&rgb), 512, 512, Interpolation::Cubic).expect("resize"))
    });
    c.bench_function("color_map 1024x1024 blur 24", |b| b.iter(|| color_map(black_box(&rgb), 24.0).expect("color")));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
