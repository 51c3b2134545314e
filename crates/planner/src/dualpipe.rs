//! DualPipe and DualPipeV, instruction for instruction as the reference implementation
//! (deepseek-ai/DualPipe) issues them: compute, every queued send and receive, and every commit.
//!
//! Both schedules run the same eight-step program on each rank; they differ only in how a
//! rank's two "phases" map onto stages, micro-batches and neighbours:
//!
//! - DualPipe (N even, C even): two pipelines over the same N stages, `0 -> N-1` carrying
//!   micro-batches `0..C/2` and `N-1 -> 0` carrying `C/2..C`. A rank in the first half sees the
//!   first pipeline as its near phase; a rank in the second half sees the second one. The step
//!   program runs with `lanes = N/2`, `position = min(r, N-1-r)`, `chunks = C/2`.
//! - DualPipeV (any N, any C): one pipeline folded into a V over 2N stages; rank r holds stage r
//!   (down the V) and stage 2N-1-r (back up), and the last rank hands its output to itself. The
//!   step program runs with `lanes = N`, `position = r`, `chunks = C`.
//!
//! Sends are queued behind the compute that produced them and leave with the next commit,
//! together with the receives of the next step: this batching is part of the schedule.

use std::collections::VecDeque;

use dualpipe_schedule::{Instruction, Kind, Work};

/// Which of the two bidirectional schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// Two pipelines in opposite directions, each stage held by two ranks.
    DualPipe,
    /// One pipeline folded into a V, two distinct stages per rank.
    DualPipeV,
}

/// Emits one rank's instruction list.
struct RankProgram {
    variant: Variant,
    num_ranks: u32,
    rank: u32,
    /// Micro-batches per phase (C/2 for DualPipe, C for DualPipeV).
    chunks: u32,
    forward_only: bool,
    /// Whether step-level phases are swapped (DualPipe ranks in the second half).
    flipped: bool,
    out: Vec<Instruction>,
    /// Something was queued since the last commit.
    queued: bool,
    forwards: [u32; 2],
    backwards: [u32; 2],
    act_recvs: [u32; 2],
    act_sends: [u32; 2],
    grad_recvs: [u32; 2],
    grad_sends: [u32; 2],
    /// Deferred weight gradients, oldest first.
    pending_w: VecDeque<Work>,
}

/// Instruction list of `rank` for DualPipe or DualPipeV with `num_ranks` ranks and
/// `microbatches` micro-batches. The caller checks the family's constraints.
pub(crate) fn rank_program(
    variant: Variant,
    num_ranks: u32,
    microbatches: u32,
    rank: u32,
    forward_only: bool,
) -> Vec<Instruction> {
    let (lanes, position, chunks, turn) = match variant {
        Variant::DualPipe => {
            let half = num_ranks / 2;
            let position = rank.min(num_ranks - 1 - rank);
            (half, position, microbatches / 2, position == half - 1)
        }
        Variant::DualPipeV => (num_ranks, rank, microbatches, rank == num_ranks - 1),
    };
    let mut p = RankProgram {
        variant,
        num_ranks,
        rank,
        chunks,
        forward_only,
        flipped: variant == Variant::DualPipe && rank >= num_ranks / 2,
        out: Vec::new(),
        queued: false,
        forwards: [0; 2],
        backwards: [0; 2],
        act_recvs: [0; 2],
        act_sends: [0; 2],
        grad_recvs: [0; 2],
        grad_sends: [0; 2],
        pending_w: VecDeque::new(),
    };
    p.run(lanes, position, turn);
    p.out
}

impl RankProgram {
    /// The eight steps. `turn` marks the rank where the two directions meet (the middle ranks
    /// of DualPipe, the last rank of DualPipeV): there the first step-4 forward and backward
    /// are not overlapped, and the last step-2 forward is sent only in step 4.
    fn run(&mut self, lanes: u32, position: u32, turn: bool) {
        let rest = lanes - position - 1;

        // 1: forwards of the near phase only.
        for _ in 0..2 * rest {
            self.forward_chunk(0, true, true);
        }

        // 2: alternate near and far forwards. The receive for each near forward is queued one
        // chunk early, with the previous far forward's batch.
        let step2 = position + 1;
        self.recv_forward(0);
        for i in 0..step2 {
            self.forward_chunk(0, false, turn);
            self.recv_forward(0);
            self.forward_chunk(1, true, !turn || i + 1 < step2);
            if !turn {
                self.send_forward(0);
            }
        }

        // 3: far backward (weights deferred), its weight gradient, far forward.
        for _ in 0..rest {
            self.backward_chunk(1, true, true, true);
            self.recv_forward(1);
            self.weight_chunk();
            self.forward_chunk(1, false, true);
        }

        // 4: the main overlapped part.
        let step4 = self.chunks + position + 1 - 2 * lanes;
        for i in 0..step4 {
            if i == 0 && turn {
                // Not overlapped, to shorten the bubble at the turn.
                self.forward_chunk(0, false, false);
                self.send_forward(1);
                self.backward_chunk(1, false, true, false);
                self.send_forward(0);
                self.send_backward(1);
            } else {
                self.forward_backward_chunk(0, 1, i > 0);
            }
            self.forward_backward_chunk(1, 0, true);
        }

        // 5: far backward, then overlapped far forward and near backward.
        for _ in 0..rest {
            self.backward_chunk(1, false, true, true);
            self.forward_backward_chunk(1, 0, true);
        }

        // 6: backwards of both phases; the second half of them defer their weights, starting
        // with the far or the near one depending on the parity of the position.
        let step6 = position + 1;
        let mut defer = false;
        for i in 0..step6 {
            if i == step6 / 2 && position % 2 == 1 {
                defer = true;
            }
            self.backward_chunk(1, defer, true, true);
            if i == step6 / 2 && position % 2 == 0 {
                defer = true;
            }
            self.backward_chunk(0, defer, true, true);
        }

        // 7: a weight gradient, then a near backward with deferred weights.
        for _ in 0..rest {
            self.weight_chunk();
            self.backward_chunk(0, true, true, true);
        }

        // 8: the remaining weight gradients.
        for _ in 0..step6 {
            self.weight_chunk();
        }
        self.commit();
    }

    /// The phase that indexes counters and stages: the step-level phase, swapped on DualPipe
    /// ranks in the second half.
    fn actual(&self, phase: usize) -> usize {
        phase ^ usize::from(self.flipped)
    }

    /// The stage this rank runs in actual phase `phase`.
    fn stage(&self, phase: usize) -> u32 {
        let (n, r) = (self.num_ranks, self.rank);
        match (self.variant, phase) {
            (_, 0) => r,
            (Variant::DualPipe, _) => n - 1 - r,
            (Variant::DualPipeV, _) => 2 * n - 1 - r,
        }
    }

    /// The global micro-batch of local index `local` in actual phase `phase`.
    fn mb(&self, phase: usize, local: u32) -> u32 {
        match (self.variant, phase) {
            (Variant::DualPipe, 1) => self.chunks + local,
            _ => local,
        }
    }

    fn work(&self, phase: usize, local: u32) -> Work {
        Work::new(self.stage(phase), self.mb(phase, local))
    }

    fn first_rank(&self) -> bool {
        self.rank == 0
    }

    fn last_rank(&self) -> bool {
        self.rank == self.num_ranks - 1
    }

    /// The stage of this phase is the model's first: its input is the batch itself.
    fn first_stage(&self, phase: usize) -> bool {
        (self.first_rank() && phase == 0)
            || (self.last_rank() && phase == 1 && self.variant == Variant::DualPipe)
    }

    /// The stage of this phase is the model's last: the loss is computed here.
    fn last_stage(&self, phase: usize) -> bool {
        (self.first_rank() && phase == 1)
            || (self.last_rank() && phase == 0 && self.variant == Variant::DualPipe)
    }

    /// At the bottom of DualPipeV's V, phase `side` hands off locally instead of communicating
    /// (phase 0's output and phase 1's input gradient stay on the last rank).
    fn v_turn(&self, phase: usize, side: usize) -> bool {
        self.variant == Variant::DualPipeV && self.last_rank() && phase == side
    }

    /// Activations of this phase arrive from another rank (not the batch, not a hand-off).
    fn receives_act(&self, phase: usize) -> bool {
        !(self.first_stage(phase) || self.v_turn(phase, 1))
    }

    /// Activations of this phase leave for another rank (not the loss, not a hand-off).
    fn sends_act(&self, phase: usize) -> bool {
        !(self.last_stage(phase) || self.v_turn(phase, 0))
    }

    /// Gradients of this phase arrive from another rank.
    fn receives_grad(&self, phase: usize) -> bool {
        self.sends_act(phase)
    }

    /// Gradients of this phase leave for another rank.
    fn sends_grad(&self, phase: usize) -> bool {
        self.receives_act(phase)
    }

    /// Phase 0 flows towards higher ranks, phase 1 towards lower ones.
    fn downstream(&self, phase: usize) -> u32 {
        if phase == 0 {
            self.rank + 1
        } else {
            self.rank - 1
        }
    }

    fn upstream(&self, phase: usize) -> u32 {
        if phase == 0 {
            self.rank - 1
        } else {
            self.rank + 1
        }
    }

    fn recv_forward(&mut self, phase: usize) {
        let phase = self.actual(phase);
        if !self.receives_act(phase) {
            return;
        }
        let work = self.work(phase, self.act_recvs[phase]);
        self.act_recvs[phase] += 1;
        self.queue(Instruction::recv(
            Kind::Act,
            work.stage,
            work.mb,
            self.upstream(phase),
        ));
    }

    fn send_forward(&mut self, phase: usize) {
        let phase = self.actual(phase);
        if !self.sends_act(phase) {
            return;
        }
        let work = self.work(phase, self.act_sends[phase]);
        self.act_sends[phase] += 1;
        self.queue(Instruction::send(
            Kind::Act,
            work.stage,
            work.mb,
            self.downstream(phase),
        ));
    }

    fn recv_backward(&mut self, phase: usize) {
        let phase = self.actual(phase);
        if self.forward_only || !self.receives_grad(phase) {
            return;
        }
        let work = self.work(phase, self.grad_recvs[phase]);
        self.grad_recvs[phase] += 1;
        self.queue(Instruction::recv(
            Kind::Grad,
            work.stage,
            work.mb,
            self.downstream(phase),
        ));
    }

    fn send_backward(&mut self, phase: usize) {
        let phase = self.actual(phase);
        if self.forward_only || !self.sends_grad(phase) {
            return;
        }
        let work = self.work(phase, self.grad_sends[phase]);
        self.grad_sends[phase] += 1;
        self.queue(Instruction::send(
            Kind::Grad,
            work.stage,
            work.mb,
            self.upstream(phase),
        ));
    }

    fn queue(&mut self, instruction: Instruction) {
        self.out.push(instruction);
        self.queued = true;
    }

    /// Posts the queued batch, if there is one.
    fn commit(&mut self) {
        if self.queued {
            self.out.push(Instruction::Commit);
            self.queued = false;
        }
    }

    fn next_forward(&mut self, phase: usize) -> Work {
        let work = self.work(phase, self.forwards[phase]);
        self.forwards[phase] += 1;
        work
    }

    fn next_backward(&mut self, phase: usize) -> Work {
        let work = self.work(phase, self.backwards[phase]);
        self.backwards[phase] += 1;
        work
    }

    fn forward_chunk(&mut self, phase: usize, recv: bool, send: bool) {
        if recv {
            self.recv_forward(phase);
        }
        self.commit();
        let work = self.next_forward(self.actual(phase));
        self.out.push(Instruction::Forward(work));
        if send {
            self.send_forward(phase);
        }
    }

    fn backward_chunk(&mut self, phase: usize, defer_w: bool, recv: bool, send: bool) {
        if recv {
            self.recv_backward(phase);
        }
        // The commit happens in inference too: it flushes sends queued by forwards.
        self.commit();
        if !self.forward_only {
            let work = self.next_backward(self.actual(phase));
            self.out.push(Instruction::Backward { work, defer_w });
            if defer_w {
                self.pending_w.push_back(work);
            }
        }
        if send {
            self.send_backward(phase);
        }
    }

    fn forward_backward_chunk(&mut self, f_phase: usize, b_phase: usize, recv_f: bool) {
        if recv_f {
            self.recv_forward(f_phase);
        }
        self.recv_backward(b_phase);
        self.commit();
        let f = self.next_forward(self.actual(f_phase));
        if self.forward_only {
            self.out.push(Instruction::Forward(f));
        } else {
            let b = self.next_backward(self.actual(b_phase));
            self.out.push(Instruction::ForwardBackward { f, b });
        }
        self.send_forward(f_phase);
        self.send_backward(b_phase);
    }

    fn weight_chunk(&mut self) {
        if self.forward_only {
            return;
        }
        self.commit();
        let work = self
            .pending_w
            .pop_front()
            .expect("every weight step follows a deferred backward");
        self.out.push(Instruction::Weight(work));
    }
}
