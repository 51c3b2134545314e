//! The partitioner against brute force over every cut, and its promises.

use dualpipe_partition::{
    Layer, Layers, Model, Objective, Options, PartitionError, partition, partition_model,
};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::ValidSchedule;

fn planned(family: Family, n: u32, c: u32) -> ValidSchedule {
    let mut request = PlanRequest::new(family, n, c);
    if family == Family::Interleaved1F1B {
        request = request.chunks_per_rank(2);
    }
    plan(&request).unwrap()
}

/// A small deterministic generator (no dependency, same cases on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Layers with varied costs: some heavy, some free, `w` a share of `b`.
fn random_layers(rng: &mut Lcg, count: usize) -> Layers {
    let layers = (0..count)
        .map(|_| {
            let scale = match (rng.next() * 10.0) as u32 {
                0 => 0.0,
                1 => 8.0,
                _ => 1.0,
            };
            let f = (rng.next() * 4.0).round() * scale;
            let b = f * 2.0 + (rng.next() * 2.0).round();
            Layer {
                name: None,
                f,
                b,
                w: (b * rng.next()).floor().min(b),
                fb: None,
                param_bytes: (rng.next() * 100.0).round(),
                activation_bytes: (rng.next() * 50.0).round(),
            }
        })
        .collect();
    Layers { unit: None, layers }
}

/// Every cut of `l` layers into `s` non-empty stages.
fn all_cuts(l: usize, s: usize) -> Vec<Vec<usize>> {
    fn go(cut: &mut Vec<usize>, l: usize, s: usize, out: &mut Vec<Vec<usize>>) {
        let i = cut.len();
        if i == s {
            cut.push(l);
            out.push(cut.clone());
            cut.pop();
            return;
        }
        let from = cut[i - 1] + 1;
        for next in from..=l - (s - i) {
            cut.push(next);
            go(cut, l, s, out);
            cut.pop();
        }
    }
    let mut out = Vec::new();
    go(&mut vec![0], l, s, &mut out);
    out
}

const MIRRORED: [(Family, u32, u32); 8] = [
    (Family::OneFOneB, 3, 4),
    (Family::GPipe, 2, 3),
    (Family::Zb1p, 4, 4),
    (Family::DualPipeV, 1, 2),
    (Family::DualPipeV, 2, 4),
    (Family::Zbv, 3, 3),
    (Family::DualPipe, 2, 4),
    (Family::DualPipe, 4, 8),
];

#[test]
fn the_bottleneck_optimum_is_the_brute_force_optimum() {
    let mut rng = Lcg(7);
    let mut cases = 0;
    for (family, n, c) in MIRRORED {
        let valid = planned(family, n, c);
        let s = valid.schedule().num_stages as usize;
        for l in [s, s + 1, s + 3, 9.max(s + 2)] {
            for _ in 0..6 {
                let layers = random_layers(&mut rng, l);
                let model = Model::new(&layers, &valid);
                let cuts = all_cuts(l, s);
                let brute = cuts
                    .iter()
                    .map(|cut| model.bottleneck(cut))
                    .fold(f64::INFINITY, f64::min);
                let options = Options {
                    memory_cap: None,
                    max_evaluations: 0,
                };
                let result = partition_model(&model, &options).unwrap();
                assert!(result.exact);
                assert_eq!(result.objective, Objective::Bottleneck);
                assert!(
                    (result.bottleneck_optimum - brute).abs() <= 1e-9 * brute.max(1.0),
                    "{family} {n}x{c}, {l} layers: got {} ({:?}), brute force {brute}",
                    result.bottleneck_optimum,
                    result.bottleneck_cut
                );
                model.check_cut(&result.cut).unwrap();
                // Under a memory cap: the least bottleneck among the cuts within the cap.
                let bounds: Vec<f64> = cuts
                    .iter()
                    .map(|cut| model.memory_bound(cut).into_iter().fold(0.0, f64::max))
                    .collect();
                let mut sorted = bounds.clone();
                sorted.sort_by(f64::total_cmp);
                let cap = sorted[sorted.len() / 3];
                let brute = cuts
                    .iter()
                    .zip(&bounds)
                    .filter(|(_, m)| **m <= cap)
                    .map(|(cut, _)| model.bottleneck(cut))
                    .fold(f64::INFINITY, f64::min);
                let capped = partition_model(
                    &model,
                    &Options {
                        memory_cap: Some(cap),
                        max_evaluations: 0,
                    },
                )
                .unwrap();
                assert!(
                    (capped.bottleneck_optimum - brute).abs() <= 1e-9 * brute.max(1.0),
                    "{family} {n}x{c}, {l} layers, cap {cap}: got {}, brute force {brute}",
                    capped.bottleneck_optimum
                );
                assert!(model.memory_bound(&capped.cut).iter().all(|&m| m <= cap));
                // Just below the least bound of all: impossible, and the error says the least.
                let least = sorted[0];
                if least >= 1.0 {
                    let error = partition_model(
                        &model,
                        &Options {
                            memory_cap: Some(least - 0.5),
                            max_evaluations: 0,
                        },
                    )
                    .unwrap_err();
                    assert_eq!(
                        error,
                        PartitionError::MemoryCap {
                            cap: least - 0.5,
                            least: Some(least.ceil())
                        }
                    );
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 8 * 4 * 6);
}

#[test]
fn the_refined_cut_never_simulates_slower_than_the_bottleneck_optimum_or_the_equal_cut() {
    let mut rng = Lcg(11);
    for (family, n, c) in MIRRORED
        .into_iter()
        .chain([(Family::Interleaved1F1B, 2, 4)])
    {
        let valid = planned(family, n, c);
        let s = valid.schedule().num_stages as usize;
        for _ in 0..4 {
            let layers = random_layers(&mut rng, 3 * s + 2);
            let result = partition(&layers, &valid, &Options::default()).unwrap();
            let model = Model::new(&layers, &valid);
            model.check_cut(&result.cut).unwrap();
            assert_eq!(result.objective, Objective::Step);
            assert!(result.predicted_step <= result.bottleneck_step);
            // Nor slower than the equal-layer cut (no cap here, so it is always allowed).
            assert!(result.predicted_step <= result.equal_cut_step);
            assert_eq!(result.predicted_step, model.step(&result.cut).unwrap());
            assert_eq!(
                result.bottleneck_step,
                model.step(&result.bottleneck_cut).unwrap()
            );
            assert_eq!(result.exact, family != Family::Interleaved1F1B);
            // The rank loads are what the simulator counts as busy time.
            let run = dualpipe_schedule::simulate(
                &valid,
                &model.costs(&result.cut),
                dualpipe_schedule::ExecutionModel::Blocking,
            )
            .unwrap();
            for (load, rank) in result.rank_load.iter().zip(&run.ranks) {
                assert!((load - rank.busy).abs() <= 1e-9 * load.max(1.0));
            }
        }
    }
}

fn uniform(count: usize) -> Vec<Layer> {
    (0..count)
        .map(|_| Layer {
            name: None,
            f: 1.0,
            b: 2.0,
            w: 1.0,
            fb: None,
            param_bytes: 10.0,
            activation_bytes: 1.0,
        })
        .collect()
}

#[test]
fn heavy_first_and_last_layers_move_layers_off_rank_0_in_a_v() {
    for family in [Family::DualPipeV, Family::Zbv] {
        let valid = planned(family, 4, 8);
        let mut layers = uniform(32);
        for i in [0, 31] {
            layers[i].f = 6.0;
            layers[i].b = 12.0;
        }
        let layers = Layers {
            unit: Some("ms".into()),
            layers,
        };
        let result = partition(&layers, &valid, &Options::default()).unwrap();
        let ranges = result.ranges();
        let on_rank_0 = (ranges[0].1 - ranges[0].0) + (ranges[7].1 - ranges[7].0);
        // The equal cut gives rank 0 eight layers, two of them heavy.
        assert!(on_rank_0 < 8, "{family}: {ranges:?}");
        assert!(result.bottleneck < result.equal_cut_bottleneck);
        assert!(result.predicted_step < result.equal_cut_step);
        assert!(ranges.iter().all(|(a, b)| a < b), "no empty stage");
    }
}

#[test]
fn no_stage_is_ever_empty() {
    // As many layers as stages, most of them free: every stage still gets one.
    for (family, n, c) in MIRRORED {
        let valid = planned(family, n, c);
        let s = valid.schedule().num_stages as usize;
        let mut layers = uniform(s);
        for layer in &mut layers[1..] {
            *layer = Layer::default();
        }
        let result =
            partition(&Layers { unit: None, layers }, &valid, &Options::default()).unwrap();
        assert_eq!(result.cut, (0..=s).collect::<Vec<_>>());
    }
}

#[test]
fn errors_name_the_problem() {
    let valid = planned(Family::DualPipeV, 4, 8);
    let few = Layers {
        unit: None,
        layers: uniform(7),
    };
    let error = partition(&few, &valid, &Options::default()).unwrap_err();
    assert_eq!(
        error,
        PartitionError::TooFewLayers {
            layers: 7,
            stages: 8
        }
    );
    assert!(error.to_string().contains("7 layers cannot fill 8 stages"));

    let mut bad = uniform(8);
    bad[3].b = f64::NAN;
    let error = partition(
        &Layers {
            unit: None,
            layers: bad,
        },
        &valid,
        &Options::default(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("layer 3: `b` is NaN"), "{error}");

    let layers = Layers {
        unit: None,
        layers: uniform(16),
    };
    let error = partition(
        &layers,
        &valid,
        &Options {
            memory_cap: Some(10.0),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no cut keeps every rank within the memory cap of 10 bytes"),
        "{error}"
    );
    let error = partition(
        &layers,
        &valid,
        &Options {
            memory_cap: Some(-1.0),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert_eq!(error, PartitionError::BadCap(-1.0));
}

#[test]
fn the_json_document_lists_the_stages() {
    let valid = planned(Family::DualPipe, 4, 8);
    let layers = Layers {
        unit: Some("ms".into()),
        layers: uniform(10),
    };
    let model = Model::new(&layers, &valid);
    let result = partition_model(&model, &Options::default()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&result.to_json(&model)).unwrap();
    assert_eq!(json["objective"], "step");
    assert_eq!(json["unit"], "ms");
    assert_eq!(json["stages"].as_array().unwrap().len(), 4);
    // DualPipe: stage 0 on ranks 0 and 3.
    assert_eq!(json["stages"][0]["ranks"], serde_json::json!([0, 3]));
    assert_eq!(json["ranges"][3][1], 10);
    assert_eq!(json["rank_load"].as_array().unwrap().len(), 4);
}

#[test]
fn the_step_time_is_the_simulators_to_the_bit() {
    let mut rng = Lcg(23);
    for (family, n, c) in MIRRORED
        .into_iter()
        .chain([(Family::Interleaved1F1B, 2, 4), (Family::DualPipe, 6, 12)])
    {
        let valid = planned(family, n, c);
        let s = valid.schedule().num_stages as usize;
        for with_fb in [false, true] {
            let mut layers = random_layers(&mut rng, 3 * s + 2);
            if with_fb {
                for layer in layers.layers.iter_mut().step_by(2) {
                    layer.fb = Some(((layer.f + layer.b) * rng.next()).round());
                }
            }
            let model = Model::new(&layers, &valid);
            let l = layers.layers.len();
            for _ in 0..5 {
                // A random cut: S - 1 distinct inner boundaries.
                let mut inner: Vec<usize> = (1..l).collect();
                for i in (1..inner.len()).rev() {
                    inner.swap(i, (rng.next() * (i + 1) as f64) as usize);
                }
                inner.truncate(s - 1);
                inner.sort_unstable();
                let cut: Vec<usize> = [0].into_iter().chain(inner).chain([l]).collect();
                let run = dualpipe_schedule::simulate(
                    &valid,
                    &model.costs(&cut),
                    dualpipe_schedule::ExecutionModel::Blocking,
                )
                .unwrap();
                assert_eq!(
                    model.step(&cut).unwrap().to_bits(),
                    run.makespan.to_bits(),
                    "{family} {n}x{c}, fb {with_fb}, cut {cut:?}"
                );
                for (load, rank) in model.rank_load(&cut).iter().zip(&run.ranks) {
                    assert!((load - rank.busy).abs() <= 1e-9 * load.max(1.0));
                }
            }
        }
    }
}

#[test]
fn layers_fb_costs_set_the_stages_fb() {
    // DualPipe overlaps a forward and a backward as one FB; a layer whose FB is much cheaper
    // than its forward plus its backward makes the step shorter, and the loads smaller.
    let valid = planned(Family::DualPipe, 4, 16);
    let plain = Layers {
        unit: None,
        layers: uniform(16),
    };
    let mut overlapped = plain.clone();
    for layer in &mut overlapped.layers {
        layer.fb = Some(1.5);
    }
    let model = Model::new(&overlapped, &valid);
    let cut = model.equal_cut();
    let costs = model.costs(&cut);
    for s in 0..4 {
        assert_eq!(
            costs.stage(s).fb,
            Some(6.0),
            "stage {s}: four layers of fb 1.5"
        );
    }
    let run =
        dualpipe_schedule::simulate(&valid, &costs, dualpipe_schedule::ExecutionModel::Blocking)
            .unwrap();
    let without = partition(&plain, &valid, &Options::default()).unwrap();
    let with = partition(&overlapped, &valid, &Options::default()).unwrap();
    assert_eq!(with.equal_cut_step, run.makespan);
    assert!(
        with.predicted_step < without.predicted_step,
        "fb 1.5 against f + b = 3: {} vs {}",
        with.predicted_step,
        without.predicted_step
    );
    assert!(with.bottleneck < without.bottleneck);
    for (load, rank) in model.rank_load(&cut).iter().zip(&run.ranks) {
        assert!((load - rank.busy).abs() <= 1e-9 * load.max(1.0));
    }
    // From a file: a layer without `fb` counts `f + b`.
    let layers = Layers::from_json(
        r#"{"layers": [{"f": 1, "b": 2, "fb": 2.5}, {"f": 1, "b": 2}, {"f": 1, "b": 2, "fb": 2}, {"f": 1, "b": 2}]}"#,
    )
    .unwrap();
    assert_eq!(layers.layers[0].fb, Some(2.5));
    let valid = planned(Family::DualPipe, 2, 4);
    let model = Model::new(&layers, &valid);
    let costs = model.costs(&[0, 2, 4]);
    assert_eq!(costs.stage(0).fb, Some(5.5));
    assert_eq!(costs.stage(1).fb, Some(5.0));
    // Without any `fb`, the stages' stays unset.
    let costs = Model::new(&plain, &valid).costs(&[0, 8, 16]);
    assert_eq!(costs.stage(0).fb, None);
}
