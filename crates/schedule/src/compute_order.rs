//! Compute orders: per rank, the computes (F, B, W, FB) a schedule runs, in order, with the
//! header of the document they become once a lowering pass (`dualpipe_planner::lower`) has
//! placed the sends, receives and commits. The planner's single-direction families and torch's
//! CSV ([`crate::read_torch_csv`]) produce one; the lowering pass takes one.

use crate::format::{Format, Instruction, Pipeline, Schedule};
use crate::topology::Topology;

/// The header of a document: everything but the instruction lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Family name or label (the `schedule` field).
    pub schedule: String,
    /// Number of ranks.
    pub num_ranks: u32,
    /// Number of stages.
    pub num_stages: u32,
    /// Number of micro-batches.
    pub num_microbatches: u32,
    /// Inference only.
    pub forward_only: bool,
    /// Routes, and which micro-batches take each.
    pub pipelines: Vec<Pipeline>,
}

impl Header {
    /// The document with this header and these instruction lists.
    pub fn with_ranks(self, ranks: Vec<Vec<Instruction>>) -> Schedule {
        Schedule {
            format: Format::V1,
            schedule: self.schedule,
            num_ranks: self.num_ranks,
            num_stages: self.num_stages,
            num_microbatches: self.num_microbatches,
            forward_only: self.forward_only,
            pipelines: self.pipelines,
            ranks,
        }
    }
}

/// Why a header and lists are not a compute order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ComputeOrderError(String);

/// A checked compute order: a consistent header ([`Topology::new`] accepts it), one list per
/// rank, and nothing but computes in the lists. Where each compute runs and whether the order
/// can run at all is the lowering pass's to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeOrder {
    /// The document without messages.
    document: Schedule,
    topology: Topology,
}

impl ComputeOrder {
    /// Checks `ranks` (one list of computes per rank) against `header`.
    ///
    /// ```
    /// use dualpipe_schedule::{parse_program, ComputeOrder, Header, Pipeline};
    /// let header = Header {
    ///     schedule: "demo".into(), num_ranks: 2, num_stages: 2, num_microbatches: 1,
    ///     forward_only: false,
    ///     pipelines: vec![Pipeline { route: vec![0, 1], microbatches: vec![0] }],
    /// };
    /// let ranks = vec![
    ///     parse_program("F s0 m0 | B s0 m0").unwrap(),
    ///     parse_program("F s1 m0 | B s1 m0").unwrap(),
    /// ];
    /// let order = ComputeOrder::new(header.clone(), ranks).unwrap();
    /// assert_eq!(order.topology().rank_of(dualpipe_schedule::Work::new(1, 0)), 1);
    /// let with_send = vec![parse_program("F s0 m0 | send act s0 m0 -> r1").unwrap(), vec![]];
    /// assert!(ComputeOrder::new(header, with_send).is_err());
    /// ```
    pub fn new(
        header: Header,
        ranks: Vec<Vec<Instruction>>,
    ) -> Result<ComputeOrder, ComputeOrderError> {
        let document = header.with_ranks(ranks);
        let topology = Topology::new(&document).map_err(|problems| {
            ComputeOrderError(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        if let Some((rank, index, instruction)) = document
            .ranks
            .iter()
            .enumerate()
            .find_map(|(r, l)| l.iter().position(|i| !i.is_compute()).map(|i| (r, i, l[i])))
        {
            return Err(ComputeOrderError(format!(
                "rank {rank} instruction {index}: `{instruction}` is not a compute; a compute order holds computes only"
            )));
        }
        Ok(ComputeOrder { document, topology })
    }

    /// The document with the computes only (no sends, receives or commits yet).
    pub fn document(&self) -> &Schedule {
        &self.document
    }

    /// Per rank, the computes in order.
    pub fn ranks(&self) -> &[Vec<Instruction>] {
        &self.document.ranks
    }

    /// Where each stage of each micro-batch runs, read off the header.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The same order under another `schedule` name.
    pub fn named(mut self, name: &str) -> ComputeOrder {
        self.document.schedule = name.to_string();
        self
    }

    /// The document with the computes only, given back.
    pub fn into_document(self) -> Schedule {
        self.document
    }
}
