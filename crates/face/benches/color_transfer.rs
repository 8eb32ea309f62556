//! Colour transfer on 1024² (EasyPhoto's colour shift without the mask) and its parts. The input
//! is `tests/assets/astronaut.png` doubled by pixel repetition; the reference is the same with its
//! channels rotated (G, B, R). The OpenCV/numpy side, same inputs and thread count:
//! `tools/reference/face_image_bench.py`.
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo bench -p easyphoto-face --bench color_transfer
//! (cd tools/reference && ../../.venv-ref/bin/python face_image_bench.py 1)
//! ```

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use easyphoto_face::color::{color_transfer, lab_to_rgb, rgb_to_lab};
use easyphoto_face::morphology::{Plane, box_blur};
use image::{Luma, Rgb, RgbImage};

fn inputs() -> (RgbImage, RgbImage) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/assets/astronaut.png");
    let photo = easyphoto_face::load_rgb(&path).expect("test photo");
    let src = RgbImage::from_fn(1024, 1024, |x, y| *photo.get_pixel(x / 2, y / 2));
    let reference = RgbImage::from_fn(1024, 1024, |x, y| {
        let [r, g, b] = src.get_pixel(x, y).0;
        Rgb([g, b, r])
    });
    (src, reference)
}

fn bench(c: &mut Criterion) {
    let (src, reference) = inputs();
    let lab = rgb_to_lab(&src);
    let mask = Plane::<f32>::from_fn(1024, 1024, |x, y| Luma([if (x / 128 + y / 128) % 2 == 0 { 255.0 } else { 0.0 }]));
    c.bench_function("color_transfer 1024x1024", |b| {
        b.iter(|| color_transfer(black_box(&src), black_box(&reference)).expect("transfer"))
    });
    c.bench_function("rgb_to_lab 1024x1024", |b| b.iter(|| rgb_to_lab(black_box(&src))));
    c.bench_function("lab_to_rgb 1024x1024", |b| b.iter(|| lab_to_rgb(black_box(&lab))));
    c.bench_function("box_blur f32 32x32 1024x1024", |b| b.iter(|| box_blur(black_box(&mask), 32, 32).expect("blur")));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
