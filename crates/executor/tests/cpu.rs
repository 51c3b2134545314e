//! What only the CPU backend promises: buffers move without copies, copies of a stage agree
//! after a step, steps repeat, and the measured timeline is consistent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualpipe_executor::{Backward, CpuPipeline, Forward, Forwarded, Options, Stage, StageError};
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_reference::model::{Batch, Matrix, ModelSpec, ReferenceStage, Sequential};
use dualpipe_schedule::{ExecutionModel, Instruction, ValidSchedule};

fn schedule(family: Family, n: u32, c: u32) -> ValidSchedule {
    let mut request = PlanRequest::new(family, n, c);
    if family == Family::Interleaved1F1B {
        request.chunks_per_rank = Some(2);
    }
    plan(&request).unwrap()
}

fn spec(schedule: &ValidSchedule) -> ModelSpec {
    ModelSpec {
        hidden: 8,
        rows: 4,
        stages: schedule.schedule().num_stages,
        seed: 17,
    }
}

fn options(spec: &ModelSpec, model: ExecutionModel) -> Options {
    Options {
        message_shape: Some(spec.message_shape()),
        model,
        timeout: Duration::from_secs(30),
        ..Options::default()
    }
}

/// Where each buffer lived: (direction, stage, micro-batch, address of its data).
type Log = Arc<Mutex<Vec<(&'static str, u32, u32, usize)>>>;

/// The reference stage, logging the address of every buffer it takes and gives.
struct Traced {
    inner: ReferenceStage,
    log: Log,
}

fn address(m: &Matrix) -> usize {
    m.data().as_ptr() as usize
}

impl Stage for Traced {
    type Buffer = Matrix;
    type Loss = f32;

    fn forward(&mut self, f: Forward<Matrix>) -> Result<Forwarded<Matrix, f32>, StageError> {
        let (stage, mb) = (self.inner.index(), f.mb);
        self.log
            .lock()
            .unwrap()
            .push(("act in", stage, mb, address(&f.input)));
        let out = self.inner.forward(f)?;
        self.log
            .lock()
            .unwrap()
            .push(("act out", stage, mb, address(&out.output)));
        Ok(out)
    }

    fn backward(&mut self, b: Backward<Matrix>) -> Result<Option<Matrix>, StageError> {
        let (stage, mb) = (self.inner.index(), b.mb);
        if let Some(grad) = &b.output_grad {
            self.log
                .lock()
                .unwrap()
                .push(("grad in", stage, mb, address(grad)));
        }
        let grad = self.inner.backward(b)?;
        if let Some(grad) = &grad {
            self.log
                .lock()
                .unwrap()
                .push(("grad out", stage, mb, address(grad)));
        }
        Ok(grad)
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        self.inner.backward_weight(mb)
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let mut inner: Vec<&mut ReferenceStage> = copies.iter_mut().map(|c| &mut c.inner).collect();
        ReferenceStage::sum_gradients(&mut inner)
    }
}

#[test]
fn buffers_move_between_stages_without_copies() {
    // DualPipeV turns on its last rank (a local hand-off); the others cross ranks.
    for (family, n, c) in [
        (Family::DualPipeV, 3, 6),
        (Family::DualPipe, 4, 8),
        (Family::Interleaved1F1B, 1, 3),
    ] {
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            let schedule = schedule(family, n, c);
            let spec = spec(&schedule);
            let log: Log = Arc::default();
            let mut pipeline = CpuPipeline::new(schedule, options(&spec, model), |_, stage| {
                Ok(Traced {
                    inner: ReferenceStage::new(&spec, stage),
                    log: Arc::clone(&log),
                })
            })
            .unwrap();
            let batch = Batch::synthetic(&spec, c, 0);
            pipeline.step(batch.inputs, batch.targets).unwrap();
            let log = log.lock().unwrap();
            let find = |what: &str, stage: u32, mb: u32| {
                log.iter()
                    .find(|&&(w, s, m, _)| w == what && s == stage && m == mb)
                    .map(|&(.., a)| a)
                    .unwrap_or_else(|| panic!("no {what} for s{stage} m{mb}"))
            };
            let mut checked = 0;
            for mb in 0..c {
                for stage in 1..spec.stages {
                    let label = format!("{family} {model} s{stage} m{mb}");
                    assert_eq!(
                        find("act in", stage, mb),
                        find("act out", stage - 1, mb),
                        "{label}"
                    );
                    assert_eq!(
                        find("grad in", stage - 1, mb),
                        find("grad out", stage, mb),
                        "{label}"
                    );
                    checked += 2;
                }
            }
            assert_eq!(checked, 2 * c * (spec.stages - 1));
        }
    }
}

#[test]
fn copies_of_a_stage_hold_the_same_summed_gradients() {
    let schedule = schedule(Family::DualPipe, 4, 8);
    let spec = spec(&schedule);
    let mut pipeline = CpuPipeline::new(schedule, options(&spec, ExecutionModel::Async), |_, s| {
        Ok(ReferenceStage::new(&spec, s))
    })
    .unwrap();
    let batch = Batch::synthetic(&spec, 8, 0);
    pipeline.step(batch.inputs, batch.targets).unwrap();
    for stage in 0..4 {
        let copies = pipeline.copies(stage);
        assert_eq!(copies.len(), 2, "stage {stage} lives on two ranks");
        assert_eq!(
            copies[0].gradients(),
            copies[1].gradients(),
            "stage {stage}"
        );
        assert!(copies[0].gradients().w1.iter().any(|&g| g != 0.0));
    }
}

#[test]
fn repeated_steps_match_the_reference_each_step() {
    for family in [Family::DualPipe, Family::Zb1p] {
        let schedule = schedule(family, 4, 8);
        let spec = spec(&schedule);
        let mut pipeline = CpuPipeline::new(
            schedule,
            options(&spec, ExecutionModel::Blocking),
            |_, s| Ok(ReferenceStage::new(&spec, s)),
        )
        .unwrap();
        let mut reference = Sequential::new(&spec);
        for step in 0..3 {
            let batch = Batch::synthetic(&spec, 8, step);
            let ours = pipeline
                .step(batch.inputs.clone(), batch.targets.clone())
                .unwrap();
            let theirs = reference.step(&batch, true).unwrap();
            for (mb, (a, b)) in ours.losses.iter().zip(&theirs.losses).enumerate() {
                assert_eq!(
                    a.unwrap().to_bits(),
                    b.to_bits(),
                    "{family} step {step} m{mb}"
                );
            }
            // Train the pipeline; start the reference from the pipeline's parameters.
            for rank in 0..4 {
                for (_, stage) in pipeline.stages_mut(rank).iter_mut() {
                    assert_eq!(stage.pending(), 0);
                    stage.sgd(0.1);
                }
            }
            for stage in &mut reference.stages {
                stage.zero_gradients();
                stage.load_parameters(pipeline.copies(stage.index())[0]);
            }
        }
    }
}

#[test]
fn the_timeline_covers_every_instruction_and_adds_up() {
    for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
        let schedule = schedule(Family::DualPipeV, 4, 10);
        let spec = spec(&schedule);
        let mut options = options(&spec, model);
        options.profile = true;
        let mut pipeline = CpuPipeline::new(schedule.clone(), options, |_, s| {
            Ok(ReferenceStage::new(&spec, s))
        })
        .unwrap();
        let batch = Batch::synthetic(&spec, 10, 0);
        let profile = pipeline
            .step(batch.inputs, batch.targets)
            .unwrap()
            .profile
            .expect("profiling was asked for");
        let doc = schedule.schedule();
        let makespan = profile.makespan_us();
        assert!(makespan > 0.0);
        for (rank, timings) in profile.ranks.iter().enumerate() {
            let timed: Vec<usize> = doc.ranks[rank]
                .iter()
                .enumerate()
                .filter(|(_, i)| i.is_compute() || matches!(i, Instruction::Commit))
                .map(|(index, _)| index)
                .collect();
            assert_eq!(timings.iter().map(|t| t.index).collect::<Vec<_>>(), timed);
            let mut previous_end = 0.0;
            for t in timings {
                assert!(previous_end <= t.start_us, "rank {rank}: {t:?}");
                assert!(t.start_us <= t.ready_us && t.ready_us <= t.end_us, "{t:?}");
                previous_end = t.end_us;
            }
        }
        let summary = profile.summary(doc);
        for s in &summary {
            assert!(s.busy_us > 0.0);
            let total = s.busy_us + s.comm_wait_us + s.idle_us;
            assert!(
                (total - makespan).abs() < 1e-6 * makespan.max(1.0),
                "{s:?} vs {makespan}"
            );
        }
        let bubble = profile.bubble(doc);
        assert!(0.0 < bubble && bubble < 1.0, "{bubble}");
        let costs = profile.mean_costs(doc);
        assert!(costs.forward.is_some() && costs.backward_input.is_some());
        assert!(costs.weight.is_some() && costs.forward_backward.is_some());
        let trace: serde_json::Value =
            serde_json::from_str(&profile.chrome_trace(&schedule)).expect("the trace is JSON");
        let events = trace["traceEvents"].as_array().unwrap();
        let spans = events.iter().filter(|e| e["ph"] == "X").count();
        assert_eq!(spans, profile.spans(doc).len());
        let computes: usize = doc
            .ranks
            .iter()
            .flatten()
            .filter(|i| i.is_compute())
            .count();
        let on_compute_lane = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["tid"] == 0)
            .count();
        assert_eq!(on_compute_lane, computes);
    }
}

/// The reference stage, counting the overlapped calls whose two halves share the stage.
struct CountingOverlap {
    inner: ReferenceStage,
    same_stage: Arc<Mutex<u32>>,
}

impl Stage for CountingOverlap {
    type Buffer = Matrix;
    type Loss = f32;

    fn forward(&mut self, f: Forward<Matrix>) -> Result<Forwarded<Matrix, f32>, StageError> {
        self.inner.forward(f)
    }

    fn backward(&mut self, b: Backward<Matrix>) -> Result<Option<Matrix>, StageError> {
        self.inner.backward(b)
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        self.inner.backward_weight(mb)
    }

    fn forward_backward(
        &mut self,
        forward: Forward<Matrix>,
        backward_stage: Option<&mut Self>,
        backward: Backward<Matrix>,
    ) -> Result<dualpipe_executor::Overlapped<Matrix, f32>, StageError> {
        let input_grad = match backward_stage {
            // Backward first: any order of the two halves must give the same results.
            Some(other) => other.inner.backward(backward)?,
            None => {
                *self.same_stage.lock().unwrap() += 1;
                self.inner.backward(backward)?
            }
        };
        let forwarded = self.inner.forward(forward)?;
        Ok(dualpipe_executor::Overlapped {
            forwarded,
            input_grad,
        })
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let mut inner: Vec<&mut ReferenceStage> = copies.iter_mut().map(|c| &mut c.inner).collect();
        ReferenceStage::sum_gradients(&mut inner)
    }
}

#[test]
fn an_overlapped_pair_on_one_stage_runs_through_the_hook() {
    use dualpipe_schedule::{Format, Pipeline, Schedule, parse_program};
    let schedule = ValidSchedule::new(Schedule {
        format: Format::V1,
        schedule: "one stage, overlapped".into(),
        num_ranks: 1,
        num_stages: 1,
        num_microbatches: 3,
        forward_only: false,
        pipelines: vec![Pipeline {
            route: vec![0],
            microbatches: vec![0, 1, 2],
        }],
        ranks: vec![
            parse_program("F s0 m0 | FB F s0 m1 + B s0 m0 | FB F s0 m2 + B s0 m1 | B s0 m2")
                .unwrap(),
        ],
    })
    .unwrap();
    let spec = spec(&schedule);
    let same_stage = Arc::new(Mutex::new(0));
    let mut pipeline = CpuPipeline::new(
        schedule,
        options(&spec, ExecutionModel::Blocking),
        |_, s| {
            Ok(CountingOverlap {
                inner: ReferenceStage::new(&spec, s),
                same_stage: Arc::clone(&same_stage),
            })
        },
    )
    .unwrap();
    let batch = Batch::synthetic(&spec, 3, 0);
    let ours = pipeline
        .step(batch.inputs.clone(), batch.targets.clone())
        .unwrap();
    assert_eq!(*same_stage.lock().unwrap(), 2);
    let mut reference = Sequential::new(&spec);
    let theirs = reference.step(&batch, true).unwrap();
    for (a, b) in ours.losses.iter().zip(&theirs.losses) {
        assert_eq!(a.unwrap().to_bits(), b.to_bits());
    }
    let ours = pipeline.copies(0)[0].inner.gradients();
    let diff =
        dualpipe_reference::conformance::cal_diff(&ours.w1, &reference.stages[0].gradients().w1);
    assert!(diff < 1e-13, "{diff}");
}

#[test]
fn an_overlap_hook_that_runs_backward_first_gives_the_same_results() {
    let schedule = schedule(Family::DualPipe, 4, 8);
    let spec = spec(&schedule);
    let same_stage = Arc::new(Mutex::new(0));
    let mut pipeline = CpuPipeline::new(schedule, options(&spec, ExecutionModel::Async), |_, s| {
        Ok(CountingOverlap {
            inner: ReferenceStage::new(&spec, s),
            same_stage: Arc::clone(&same_stage),
        })
    })
    .unwrap();
    let batch = Batch::synthetic(&spec, 8, 0);
    let ours = pipeline
        .step(batch.inputs.clone(), batch.targets.clone())
        .unwrap();
    assert_eq!(*same_stage.lock().unwrap(), 0, "DualPipe pairs two stages");
    let mut reference = Sequential::new(&spec);
    let theirs = reference.step(&batch, true).unwrap();
    for (a, b) in ours.losses.iter().zip(&theirs.losses) {
        assert_eq!(a.unwrap().to_bits(), b.to_bits());
    }
    for stage in 0..4 {
        let ours = pipeline.copies(stage)[0].inner.gradients();
        let theirs = reference.stages[stage as usize].gradients();
        for ((name, a), (_, b)) in ours.tensors().into_iter().zip(theirs.tensors()) {
            let diff = dualpipe_reference::conformance::cal_diff(a, b);
            assert!(diff < 1e-13, "stage {stage} {name}: {diff}");
        }
    }
}

/// The reference stage, sleeping before the forward of one micro-batch.
struct Slow {
    inner: ReferenceStage,
    slow_mb: Option<u32>,
}

impl Stage for Slow {
    type Buffer = Matrix;
    type Loss = f32;

    fn forward(&mut self, f: Forward<Matrix>) -> Result<Forwarded<Matrix, f32>, StageError> {
        if self.slow_mb == Some(f.mb) {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.inner.forward(f)
    }

    fn backward(&mut self, b: Backward<Matrix>) -> Result<Option<Matrix>, StageError> {
        self.inner.backward(b)
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        self.inner.backward_weight(mb)
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let mut inner: Vec<&mut ReferenceStage> = copies.iter_mut().map(|c| &mut c.inner).collect();
        ReferenceStage::sum_gradients(&mut inner)
    }
}

#[test]
fn a_blocking_commit_waits_for_the_partner_and_an_async_one_does_not() {
    use dualpipe_schedule::{Format, Pipeline, Schedule, parse_program};
    // Rank 1 posts its second receive only after a slow forward of micro-batch 0.
    let schedule = ValidSchedule::new(Schedule {
        format: Format::V1,
        schedule: "two sends".into(),
        num_ranks: 2,
        num_stages: 2,
        num_microbatches: 2,
        forward_only: true,
        pipelines: vec![Pipeline {
            route: vec![0, 1],
            microbatches: vec![0, 1],
        }],
        ranks: vec![
            parse_program(
                "F s0 m0 | send act s0 m0 -> r1 | commit | F s0 m1 | send act s0 m1 -> r1 | commit",
            )
            .unwrap(),
            parse_program(
                "recv act s1 m0 <- r0 | commit | F s1 m0 | recv act s1 m1 <- r0 | commit | F s1 m1",
            )
            .unwrap(),
        ],
    })
    .unwrap();
    let spec = spec(&schedule);
    for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
        let mut options = options(&spec, model);
        options.profile = true;
        let mut pipeline = CpuPipeline::new(schedule.clone(), options, |_, s| {
            Ok(Slow {
                inner: ReferenceStage::new(&spec, s),
                slow_mb: (s == 1).then_some(0),
            })
        })
        .unwrap();
        let batch = Batch::synthetic(&spec, 2, 0);
        let profile = pipeline
            .step(batch.inputs, Vec::new())
            .unwrap()
            .profile
            .unwrap();
        let at = |rank: usize, index: usize| {
            *profile.ranks[rank]
                .iter()
                .find(|t| t.index == index)
                .unwrap()
        };
        let second_send = at(0, 5);
        let slow_forward = at(1, 2);
        match model {
            ExecutionModel::Blocking => assert!(
                second_send.end_us >= slow_forward.end_us,
                "the send's commit returned before its receive was posted: {second_send:?} {slow_forward:?}"
            ),
            ExecutionModel::Async => assert!(
                second_send.end_us < slow_forward.end_us,
                "the async commit waited for its partner: {second_send:?} {slow_forward:?}"
            ),
        }
    }
}

/// The driver reads the clock's marks only after the host has waited for the ranks (a GPU
/// clock's marks are events: reading them inside the step would wait for the device there).
#[test]
fn the_clock_is_read_only_after_the_host_has_settled() {
    use dualpipe_executor::{
        Clock, Executor, HostClock, InProcess, Kept, RankParts, Stages, drive,
    };
    use dualpipe_executor::{Host, RankFailure};
    use dualpipe_schedule::Lane;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    struct Watched {
        inner: HostClock,
        settled: Arc<AtomicBool>,
        early: Arc<AtomicUsize>,
    }
    impl Clock for Watched {
        type Mark = <HostClock as Clock>::Mark;
        fn mark(&mut self, lane: Lane) -> Self::Mark {
            self.inner.mark(lane)
        }
        fn micros(&mut self, mark: &Self::Mark) -> f64 {
            if !self.settled.load(Ordering::SeqCst) {
                self.early.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.micros(mark)
        }
    }
    struct Settling(Arc<AtomicBool>);
    impl Host<ReferenceStage> for Settling {
        type Buffer = Matrix;
        type Loss = f32;
        fn settle(&mut self) -> Result<(), RankFailure> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn loss(&mut self, rank: u32, loss: f32) -> Result<Option<f32>, RankFailure> {
            <Kept as Host<ReferenceStage>>::loss(&mut Kept, rank, loss)
        }
        fn output(&mut self, rank: u32, output: Matrix) -> Result<Matrix, RankFailure> {
            <Kept as Host<ReferenceStage>>::output(&mut Kept, rank, output)
        }
    }

    let schedule = schedule(Family::DualPipeV, 2, 4);
    let spec = spec(&schedule);
    let mut options = options(&spec, ExecutionModel::Async);
    options.profile = true;
    let executor = Executor::new(schedule, options);
    let doc = executor.schedule().schedule();
    let mut ranks: Vec<Stages<ReferenceStage>> = (0..doc.num_ranks)
        .map(|r| {
            Stages::new(
                executor
                    .stages_of(r)
                    .iter()
                    .map(|&s| (s, ReferenceStage::new(&spec, s))),
            )
        })
        .collect();
    let batch = Batch::synthetic(&spec, doc.num_microbatches, 0);
    let mut inputs: Vec<Option<Matrix>> = batch.inputs.into_iter().map(Some).collect();
    let mut targets: Vec<Option<Matrix>> = batch.targets.into_iter().map(Some).collect();
    let feeds = executor.split_feed(&mut inputs, &mut targets);
    let transports = InProcess::network(
        doc.num_ranks,
        ExecutionModel::Async,
        Duration::from_secs(30),
    );
    let settled = Arc::new(AtomicBool::new(false));
    let early = Arc::new(AtomicUsize::new(0));
    let origin = Instant::now();
    let parts = ranks
        .iter_mut()
        .zip(transports)
        .zip(feeds)
        .enumerate()
        .map(|(rank, ((stages, transport), feed))| RankParts {
            rank: rank as u32,
            stages,
            transport,
            feed,
            clock: Some(Watched {
                inner: HostClock::new(origin),
                settled: settled.clone(),
                early: early.clone(),
            }),
        })
        .collect();
    let step = drive(&executor, parts, &mut Settling(settled.clone())).unwrap();
    assert_eq!(
        early.load(Ordering::SeqCst),
        0,
        "marks read before the host settled"
    );
    let profile = step.profile.unwrap();
    assert!(profile.ranks.iter().all(|timeline| !timeline.is_empty()));
}
