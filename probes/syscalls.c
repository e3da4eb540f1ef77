// guardian-agent syscalls probe: per process x syscall log2 latency histograms, aggregated in
// the kernel (no per-event output).
//
// Raw tracepoints are used where the kernel has them (4.17+): the program gets the raw
// arguments without the perf buffer copy of a classic tracepoint, which on the test VM cut the
// cost of an empty enter+exit pair from 1.9x to 1.6x of a bare syscall storm. Classic
// tracepoints are the fallback (the same macros, see syscalls.py).
//
// How it measures: raw_syscalls:sys_enter stamps a per-CPU "in-flight" slot; sys_exit on the
// same thread closes it. Most syscalls never leave the CPU, so the hot path touches only that
// per-CPU slot plus one per-CPU histogram row. When a task is switched out mid-syscall,
// sched:sched_switch (which runs in the outgoing task's context, so no struct reads are needed)
// parks the slot in a hash keyed by thread id, and sys_exit finds it there: blocking calls are
// timed exactly. A shared hash keyed by thread on every call costs ~1.6x more on this kernel.
//
// Helper calls are the hot path's main cost (each one ~18 ns on the test VM, whose kernel
// guards every return against SRSO). The clock must be read twice per syscall; the process id
// need not be: the task running on a CPU changes only through sched_switch, so each CPU keeps
// the running task's tgid (and whether it is watched) until its next sched_switch, and only the
// first syscall of each time slice asks the kernel.
//
// Windows are exact because the histograms are double-buffered: the programs add each call to
// the buffer named by `epoch` when the call exits; user space flips `epoch` at a window edge,
// waits until no program can still hold the old value (an RCU grace period: see syscalls.py),
// and only then reads the buffer it retired, which nothing writes any more. Reading live rows
// one by one while a storm runs skewed a dd's read and write counts by thousands.
//
// Never dereference kernel structs here: headers may be borrowed from another kernel version.
// Only tracepoint arguments and helpers are used.
#include <uapi/linux/ptrace.h>

#define NBUCKETS 36   // slot k holds [2^(k-1), 2^k) ns; the last slot also holds everything longer
#define CACHED_SYSCALLS 512

// tgid is filled in only when the slot is parked: while it is in flight, the CPU's current_tgid
// names its task.
struct inflight_t {
    u64 start_ns;
    u32 syscall_nr;
    u32 active;
    u32 tgid;
};

struct hist_key_t {
    u32 tgid;
    u32 syscall_nr;
};

// Counts are u32 per CPU per bucket (4 billion calls of one syscall on one CPU in one window):
// halving the row keeps the per-CPU histogram array small on many-core hosts. The call count is
// the sum of the buckets (user space adds them): one increment fewer per syscall.
struct hist_t {
    u64 total_ns;
    u64 max_ns;
    u32 slots[NBUCKETS];
    char comm[16];
};

// Rows live in a per-CPU array (an array lookup is a bounds check and an add; a hash lookup
// hashes the key and walks a bucket). Each CPU numbers its own rows, so no atomics are needed:
// a per-CPU hash maps pid x syscall -> this CPU's row number + 1 (0 = none yet on this CPU),
// and it is consulted only when this CPU's cache for that syscall names another process.
struct row_cache_t {
    u32 tgid_plus_one;
    u32 row;
};

// Everything the hot path needs on this CPU in one map value: one lookup per program run.
// `current_*` describe the task running on this CPU; sched_switch clears current_known. They
// are trusted only once this CPU has seen a sched_switch (switch_seen): that proves the
// sched_switch program is attached, so no switch can go unnoticed (attach order is BCC's).
struct cpu_state_t {
    struct inflight_t slot;
    u32 current_tgid;
    u8 current_known;
    u8 current_watched;
    u8 switch_seen;
    struct row_cache_t cache[CACHED_SYSCALLS];
};

BPF_PERCPU_ARRAY(cpu_state, struct cpu_state_t, 1);
BPF_HASH(parked, u32, struct inflight_t, PARKED_MAX);
BPF_PERCPU_HASH(row_ids, struct hist_key_t, u32, HIST_MAX);
BPF_PERCPU_ARRAY(next_row, u32, 1);
// Two buffers of HIST_MAX rows: row r of buffer e is at e * HIST_MAX + r.
BPF_PERCPU_ARRAY(hists, struct hist_t, HIST_BUFFER_ROWS);
BPF_ARRAY(epoch, u32, 1);
// 0: calls not recorded (no free histogram row), 1: in-flight syscalls lost (parked map full)
BPF_PERCPU_ARRAY(lost, u64, 2);

static __always_inline void count_lost(u32 index) {
    u64 *counter = lost.lookup(&index);
    if (counter)
        (*counter)++;
}

static __always_inline int keep_tgid(u32 tgid) {
    if (tgid == SELF_TGID)
        return 0;
    PID_FILTER
    return 1;
}

static __always_inline void learn_current(struct cpu_state_t *state, u32 tgid) {
    state->current_tgid = tgid;
    state->current_watched = keep_tgid(tgid);
    state->current_known = state->switch_seen;
}

static __always_inline int row_for(struct cpu_state_t *state, u32 tgid, u32 nr, u32 *row_out) {
    struct row_cache_t *cached = 0;
    if (nr < CACHED_SYSCALLS) {
        cached = &state->cache[nr];
        if (cached->tgid_plus_one == tgid + 1) {
            *row_out = cached->row;
            return 1;
        }
    }
    struct hist_key_t key = {};
    key.tgid = tgid;
    key.syscall_nr = nr;
    u32 *row_plus_one = row_ids.lookup(&key);
    if (!row_plus_one) {
        u32 none = 0;
        if (row_ids.update(&key, &none) != 0) {
            count_lost(0);
            return 0;
        }
        row_plus_one = row_ids.lookup(&key);
        if (!row_plus_one)
            return 0;
    }
    if (*row_plus_one == 0) {
        u32 zero = 0;
        u32 *next = next_row.lookup(&zero);
        if (!next)
            return 0;
        if (*next >= HIST_MAX) {
            count_lost(0);
            return 0;
        }
        u32 fresh_row = *next;
        *row_plus_one = fresh_row + 1;
        (*next)++;
        // A new row takes the caller's thread name once, off the per-call path, in both buffers.
        struct hist_t *fresh = hists.lookup(&fresh_row);
        if (fresh)
            bpf_get_current_comm(&fresh->comm, sizeof(fresh->comm));
        u32 twin_row = fresh_row + HIST_MAX;
        struct hist_t *twin = hists.lookup(&twin_row);
        if (twin)
            bpf_get_current_comm(&twin->comm, sizeof(twin->comm));
    }
    u32 row = *row_plus_one - 1;
    if (cached) {
        cached->tgid_plus_one = tgid + 1;
        cached->row = row;
    }
    *row_out = row;
    return 1;
}

static __always_inline void record(struct cpu_state_t *state, u32 tgid, u32 nr, u64 delta_ns) {
    u32 row_number;
    if (!row_for(state, tgid, nr, &row_number))
        return;
    u32 zero = 0;
    u32 *buffer = epoch.lookup(&zero);  // an array lookup: inlined by the verifier, no helper
    if (buffer && (*buffer & 1))
        row_number += HIST_MAX;
    struct hist_t *row = hists.lookup(&row_number);
    if (!row)
        return;
    row->total_ns += delta_ns;
    if (delta_ns > row->max_ns)
        row->max_ns = delta_ns;
    u32 slot = bpf_log2l(delta_ns);
    if (slot >= NBUCKETS)
        slot = NBUCKETS - 1;
    row->slots[slot]++;
}

SYSCALL_ENTER_PROBE {
    u32 zero = 0;
    struct cpu_state_t *state = cpu_state.lookup(&zero);
    if (!state)
        return 0;
    if (!state->current_known)
        learn_current(state, bpf_get_current_pid_tgid() >> 32);
    if (!state->current_watched)
        return 0;
    struct inflight_t *slot = &state->slot;
    slot->start_ns = bpf_ktime_get_ns();
    slot->syscall_nr = (u32)SYSCALL_ID;
    slot->active = 1;
    return 0;
}

SYSCALL_EXIT_PROBE {
    u64 now = bpf_ktime_get_ns();
    u32 zero = 0;
    struct cpu_state_t *state = cpu_state.lookup(&zero);
    if (!state)
        return 0;
    struct inflight_t *slot = &state->slot;
    // An active slot belongs to the current thread: any context switch since sys_enter on this
    // CPU would have run sched_switch, which parks the slot and clears `active` (BPF programs
    // run with preemption off, so that switch cannot be missed). No pid lookup on this path.
    if (slot->active) {
        slot->active = 0;
        record(state, state->current_tgid, slot->syscall_nr, now - slot->start_ns);
        return 0;
    }
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!state->current_known)
        learn_current(state, id >> 32);
    if (!state->current_watched)
        return 0;
    struct inflight_t *waiting = parked.lookup(&tid);
    if (!waiting)
        return 0;
    record(state, waiting->tgid, waiting->syscall_nr, now - waiting->start_ns);
    parked.delete(&tid);
    return 0;
}

SCHED_SWITCH_PROBE {
    u32 zero = 0;
    struct cpu_state_t *state = cpu_state.lookup(&zero);
    if (!state)
        return 0;
    state->current_known = 0;
    state->switch_seen = 1;
    struct inflight_t *slot = &state->slot;
    if (!slot->active)
        return 0;
    slot->active = 0;
    // sched_switch runs in the outgoing task's context: the current thread is the one leaving,
    // and (no switch having happened since its sys_enter) the one that filled the slot.
    u64 id = bpf_get_current_pid_tgid();
    slot->tgid = id >> 32;
    // exit/exit_group never return: parking them would leak one entry per exiting thread.
    if (slot->syscall_nr == SYS_EXIT_NR || slot->syscall_nr == SYS_EXIT_GROUP_NR)
        return 0;
    u32 tid = (u32)id;
    if (parked.update(&tid, slot) != 0)
        count_lost(1);
    return 0;
}
