//! Where each stage of each micro-batch runs, read off a document's header.

use crate::diagnostics::{Location, Rule, Violation, abbreviate, plural};
use crate::format::{Schedule, Work};

/// The placement of work on ranks: which pipeline each micro-batch takes and which rank runs
/// each of its stages. Built from a document's header by [`Topology::new`], which checks that
/// the header is consistent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    num_ranks: u32,
    num_stages: u32,
    num_microbatches: u32,
    /// `routes[p][s]`: the rank of stage `s` on pipeline `p`.
    routes: Vec<Vec<u32>>,
    /// The pipeline of each micro-batch.
    pipeline_of: Vec<u32>,
}

impl Topology {
    /// Reads and checks the header of `schedule`: counts, routes and the micro-batch partition.
    pub fn new(schedule: &Schedule) -> Result<Topology, Vec<Violation>> {
        let mut problems = Vec::new();
        let mut problem = |message: String| {
            problems.push(Violation::new(Rule::Structure, Location::Document, message));
        };
        if schedule.num_ranks == 0 {
            problem("num_ranks is 0; a schedule needs at least one rank".into());
        }
        if schedule.num_stages == 0 {
            problem("num_stages is 0; a schedule needs at least one stage".into());
        }
        if schedule.num_microbatches == 0 {
            problem("num_microbatches is 0; a schedule needs at least one micro-batch".into());
        }
        if schedule.ranks.len() != schedule.num_ranks as usize {
            problem(format!(
                "num_ranks is {} but `ranks` holds {} lists",
                schedule.num_ranks,
                schedule.ranks.len()
            ));
        }
        if schedule.pipelines.is_empty() {
            problem("`pipelines` is empty; every micro-batch needs a route".into());
        }
        let mut pipeline_of = vec![u32::MAX; schedule.num_microbatches as usize];
        for (p, pipeline) in schedule.pipelines.iter().enumerate() {
            if pipeline.route.len() != schedule.num_stages as usize {
                problem(format!(
                    "pipeline {p}: the route names {} but num_stages is {}",
                    plural(pipeline.route.len() as u32, "rank"),
                    schedule.num_stages
                ));
            }
            for (s, &rank) in pipeline.route.iter().enumerate() {
                if rank >= schedule.num_ranks {
                    problem(format!(
                        "pipeline {p}: route[{s}] is rank {rank}, but there are only {}",
                        plural(schedule.num_ranks, "rank")
                    ));
                }
            }
            for &mb in &pipeline.microbatches {
                match pipeline_of.get_mut(mb as usize) {
                    None => problem(format!(
                        "pipeline {p}: micro-batch {mb} is out of range (num_microbatches is {})",
                        schedule.num_microbatches
                    )),
                    Some(slot) if *slot != u32::MAX => problem(format!(
                        "micro-batch {mb} is listed in pipelines {} and {p}; each micro-batch takes exactly one",
                        *slot
                    )),
                    Some(slot) => *slot = p as u32,
                }
            }
        }
        let missing: Vec<String> = pipeline_of
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p == u32::MAX)
            .map(|(mb, _)| mb.to_string())
            .collect();
        if !missing.is_empty() {
            problem(format!(
                "micro-batch(es) {} belong to no pipeline",
                abbreviate(&missing)
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Topology {
            num_ranks: schedule.num_ranks,
            num_stages: schedule.num_stages,
            num_microbatches: schedule.num_microbatches,
            routes: schedule.pipelines.iter().map(|p| p.route.clone()).collect(),
            pipeline_of,
        })
    }

    /// Number of ranks.
    pub fn num_ranks(&self) -> u32 {
        self.num_ranks
    }

    /// Number of stages.
    pub fn num_stages(&self) -> u32 {
        self.num_stages
    }

    /// Number of micro-batches.
    pub fn num_microbatches(&self) -> u32 {
        self.num_microbatches
    }

    /// Number of pipelines (routes).
    pub fn num_pipelines(&self) -> usize {
        self.routes.len()
    }

    /// The pipeline that micro-batch `mb` travels. Panics if `mb` is out of range.
    pub fn pipeline_of(&self, mb: u32) -> usize {
        self.pipeline_of[mb as usize] as usize
    }

    /// The route of pipeline `p`.
    pub fn route(&self, p: usize) -> &[u32] {
        &self.routes[p]
    }

    /// Whether `work` names an existing stage and micro-batch.
    pub fn contains(&self, work: Work) -> bool {
        work.stage < self.num_stages && work.mb < self.num_microbatches
    }

    /// The rank that runs `work`. Panics if `work` is out of range.
    pub fn rank_of(&self, work: Work) -> u32 {
        self.routes[self.pipeline_of(work.mb)][work.stage as usize]
    }

    /// The rank of the stage before `work`'s, or `None` at stage 0.
    pub fn prev_rank(&self, work: Work) -> Option<u32> {
        (work.stage > 0).then(|| self.rank_of(Work::new(work.stage - 1, work.mb)))
    }

    /// The rank of the stage after `work`'s, or `None` at the last stage.
    pub fn next_rank(&self, work: Work) -> Option<u32> {
        (work.stage + 1 < self.num_stages).then(|| self.rank_of(Work::new(work.stage + 1, work.mb)))
    }

    /// Whether `stage` is the last one (where the loss is computed).
    pub fn is_last_stage(&self, stage: u32) -> bool {
        stage + 1 == self.num_stages
    }

    /// Dense index of `work` in `0..num_stages * num_microbatches`.
    pub(crate) fn slot(&self, work: Work) -> usize {
        work.stage as usize * self.num_microbatches as usize + work.mb as usize
    }

    /// The distinct stages `rank` runs, in the order a runtime builds its modules: the
    /// pipelines in document order (those that carry at least one micro-batch), within one
    /// pipeline by ascending stage number, each stage at its first appearance.
    ///
    /// This gives the families' conventions: DualPipe rank r holds `[r, N-1-r]` (its stage on
    /// the route `0..N-1` first, for every r), DualPipeV and ZB-V `[r, 2N-1-r]`, interleaved
    /// 1F1B `[r, r+N, r+2N, ...]`, the others `[r]`. Empty for a rank out of range.
    ///
    /// ```
    /// use dualpipe_schedule::{Format, Pipeline, Schedule, Topology};
    /// let schedule = Schedule {
    ///     format: Format::V1,
    ///     schedule: "dualpipe".into(),
    ///     num_ranks: 4,
    ///     num_stages: 4,
    ///     num_microbatches: 2,
    ///     forward_only: false,
    ///     pipelines: vec![
    ///         Pipeline { route: vec![0, 1, 2, 3], microbatches: vec![0] },
    ///         Pipeline { route: vec![3, 2, 1, 0], microbatches: vec![1] },
    ///     ],
    ///     ranks: vec![vec![]; 4],
    /// };
    /// let topology = Topology::new(&schedule).unwrap();
    /// assert_eq!(topology.stages_on(1), [1, 2]);
    /// assert_eq!(topology.stages_on(3), [3, 0]);
    /// ```
    pub fn stages_on(&self, rank: u32) -> Vec<u32> {
        let mut used = vec![false; self.routes.len()];
        for &p in &self.pipeline_of {
            if let Some(slot) = used.get_mut(p as usize) {
                *slot = true;
            }
        }
        let mut seen = vec![false; self.num_stages as usize];
        let mut stages = Vec::new();
        for (route, _) in self.routes.iter().zip(&used).filter(|&(_, &used)| used) {
            for (stage, &r) in route.iter().enumerate() {
                if r == rank && seen.get(stage).is_some_and(|&seen| !seen) {
                    seen[stage] = true;
                    stages.push(stage as u32);
                }
            }
        }
        stages
    }

    /// How many distinct stages each rank holds parameters for (2 for DualPipe and DualPipeV,
    /// `V` for interleaved schedules, 1 for 1F1B).
    pub fn stages_per_rank(&self) -> Vec<u32> {
        let mut held = std::collections::BTreeSet::new();
        for route in &self.routes {
            for (stage, &rank) in route.iter().enumerate() {
                held.insert((rank, stage));
            }
        }
        let mut counts = vec![0u32; self.num_ranks as usize];
        for (rank, _) in held {
            counts[rank as usize] += 1;
        }
        counts
    }
}
