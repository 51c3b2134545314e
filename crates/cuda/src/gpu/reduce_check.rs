//! The reduction kernels on the GPU against their CPU emulation
//! ([`crate::kernels::mse_reference`], [`crate::kernels::column_sums_reference`]), which sums
//! in the kernels' order. Without a GPU each check prints `skipped: no GPU` and passes.

use std::sync::Arc;

use super::RankDevice;
use super::device::{Device, open};
use crate::kernels::{self, DType};

fn gpu() -> Option<(Device, Arc<RankDevice>)> {
    match open(0) {
        Ok(device) => {
            let dev = RankDevice::new(&device.ctx, &device.kernels, DType::F32, false)
                .unwrap_or_else(|e| panic!("{e}"));
            Some((device, dev))
        }
        Err(e) if e.is_no_gpu() => {
            eprintln!("skipped: no GPU ({e})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn value(i: usize) -> f32 {
    ((i * 7919 % 1000) as f32 - 500.0) / 256.0
}

fn close(gpu: f32, cpu: f32) -> bool {
    (f64::from(gpu) - f64::from(cpu)).abs() <= 1e-6 * f64::from(cpu).abs().max(1e-30)
}

#[test]
fn the_loss_reduction_matches_its_cpu_emulation() {
    let Some((_device, dev)) = gpu() else {
        return;
    };
    for n in [1usize, 1023, 4097, 70_000, (1 << 22) + 3] {
        let y: Vec<f32> = (0..n).map(value).collect();
        let t: Vec<f32> = (0..n).map(|i| value(i + 17)).collect();
        let yd = dev.upload(&y, [1, n]).unwrap();
        let td = dev.upload(&t, [1, n]).unwrap();
        let mut grad = dev.alloc(&dev.main, [1, n]).unwrap();
        let mut loss = dev.main.alloc_zeros::<f32>(1).unwrap();
        dev.kernels
            .mse(&dev.main, grad.buf_mut(), &mut loss, yd.buf(), td.buf())
            .unwrap();
        let got = dev.main.clone_dtoh(&loss).unwrap()[0];
        let want = kernels::mse_reference(&y, &t);
        assert!(close(got, want), "n {n}: GPU {got}, CPU {want}");
    }
}

#[test]
fn the_column_sums_match_their_cpu_emulation() {
    let Some((_device, dev)) = gpu() else {
        return;
    };
    for (rows, cols) in [(1usize, 1usize), (15, 33), (1024, 4096), (3000, 70)] {
        let x: Vec<f32> = (0..rows * cols).map(value).collect();
        let start: Vec<f32> = (0..cols).map(|c| value(c + 5)).collect();
        let xd = dev.upload(&x, [rows, cols]).unwrap();
        let mut sums = dev.main.clone_htod(&start).unwrap();
        dev.kernels
            .column_sums_add(&dev.main, &mut sums, xd.buf(), rows, cols)
            .unwrap();
        let got = dev.main.clone_dtoh(&sums).unwrap();
        let mut want = start.clone();
        kernels::column_sums_reference(&mut want, &x, rows, cols);
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(close(*g, *w), "{rows}x{cols} column {c}: GPU {g}, CPU {w}");
        }
    }
}
