//! Cost of one sampler step, per element, next to a plain memcpy of the same buffer.
//!
//! `cargo bench -p esddpm-core --bench step` prints a Markdown table (README.md's). Each
//! cell is the median of `ROUNDS` timings of `REPS` consecutive steps, after a warm-up.
//! Shapes are batch 1: 1x32x32, 3x32x32 and 3x256x256.

use esddpm_core::*;
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: usize = 31;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per call of `f`, calling it `reps` times per round.
fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    for _ in 0..reps {
        f();
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_nanos() as f64 / reps as f64
        })
        .collect();
    median(rounds)
}

struct Case {
    name: &'static str,
    kind: SamplerKind,
}

fn main() {
    let mut abar = vec![0.0f64; 1000];
    let schedule = NoiseSchedule::new(&ScheduleConfig::default(), &mut abar).unwrap();
    let mut chain = vec![0u32; 1000];
    let chain = Respacing::parse("1000")
        .unwrap()
        .fill(1000, &mut chain)
        .unwrap();
    let cases = [
        Case {
            name: "DDPM fixed_small",
            kind: SamplerKind::Ddpm {
                variance_type: VarianceType::FixedSmall,
            },
        },
        Case {
            name: "DDPM learned_range",
            kind: SamplerKind::Ddpm {
                variance_type: VarianceType::LearnedRange,
            },
        },
        Case {
            name: "DDIM eta=0",
            kind: SamplerKind::Ddim {
                eta: 0.0,
                use_clipped_model_output: false,
            },
        },
        Case {
            name: "DDIM eta=1",
            kind: SamplerKind::Ddim {
                eta: 1.0,
                use_clipped_model_output: false,
            },
        },
        Case {
            name: "DPM-Solver++(2M)",
            kind: SamplerKind::DpmSolverPlusPlus2M,
        },
    ];
    let shapes = [(1usize, 32usize, 32usize), (3, 32, 32), (3, 256, 256)];

    println!("| step | 1x32x32 ns/elem | 3x32x32 ns/elem | 3x256x256 ns/elem |");
    println!("|---|---|---|---|");
    let mut memcpy_row = Vec::new();
    let mut rows: Vec<(String, Vec<(f64, f64)>)> =
        cases.iter().map(|c| (c.name.to_string(), vec![])).collect();
    for &(c, h, w) in &shapes {
        let shape = ImageShape::new(1, c, h, w).unwrap();
        let len = shape.len();
        let reps = (200_000 / len).max(3);
        let src: Vec<f32> = (0..len).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
        let mut dst = vec![0.0f32; len];
        let memcpy = time(reps * 10, || {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }) / len as f64;
        memcpy_row.push(memcpy);
        for (case, row) in cases.iter().zip(rows.iter_mut()) {
            let config = SamplerConfig {
                kind: case.kind,
                ..Default::default()
            };
            let mut base = Sampler::new(
                schedule,
                chain,
                StartAt::EarlyStop { steps: 500 },
                config,
                shape,
                1,
            )
            .unwrap();
            let mut x = src.clone();
            base.init(&mut x, Init::Image(&src)).unwrap();
            let out: Vec<f32> = (0..base.model_output_len())
                .map(|i| ((i % 13) as f32 / 6.5) - 1.0)
                .collect();
            let mut work = vec![0.0f32; base.workspace_len()];
            // One step first, so DPM-Solver++ has history and takes its 2nd-order path.
            base.step(&mut x, &out, &mut work).unwrap();
            let ns = time(reps, || {
                let mut s = base.clone();
                s.step(&mut x, black_box(&out), &mut work).unwrap();
            }) / len as f64;
            row.1.push((ns, ns / memcpy));
        }
    }
    print!("| memcpy (f32) |");
    for m in &memcpy_row {
        print!(" {m:.3} |");
    }
    println!();
    for (name, cells) in rows {
        print!("| {name} |");
        for (ns, ratio) in cells {
            print!(" {ns:.2} ({ratio:.0}x memcpy) |");
        }
        println!();
    }
}
