// Core-to-core round trip: two threads, pinned to CPUs A and B, pass one cache line back and forth ROUNDS times
// in 21 bursts; prints the median burst's mean round trip in nanoseconds (the median, because a burst in which
// either thread was preempted measures the scheduler, not the machine).
//
// tools/benchmark.py builds it with the system C compiler and runs it before every timed iteration. On a virtual
// machine this time changes with where the hypervisor places the virtual CPUs, and an engine that splits one
// image's kernels over the cores slows with it (docs/performance.md).
//
//     cc -O2 -pthread tools/core_round_trip.c -o core_round_trip && ./core_round_trip 0 1 100000
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BURSTS 21

static _Alignas(64) atomic_long ball;  // 2i + 1: serve i, on its way to B; 2i + 2: returned to A
static long rounds;

static void *player_b(void *unused) {
    for (long i = 0; i < rounds; i++) {
        while (atomic_load_explicit(&ball, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&ball, 2 * i + 2, memory_order_release);
    }
    return unused;
}

static int by_value(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CPU_A CPU_B ROUNDS\n", argv[0]);
        return 2;
    }
    long burst = atol(argv[3]) / BURSTS > 0 ? atol(argv[3]) / BURSTS : 1;
    rounds = burst * BURSTS;
    cpu_set_t a, b;
    CPU_ZERO(&a);
    CPU_SET(atoi(argv[1]), &a);
    CPU_ZERO(&b);
    CPU_SET(atoi(argv[2]), &b);
    pthread_attr_t on_b;
    pthread_attr_init(&on_b);
    pthread_t thread;
    if (pthread_setaffinity_np(pthread_self(), sizeof a, &a) || pthread_attr_setaffinity_np(&on_b, sizeof b, &b)
        || pthread_create(&thread, &on_b, player_b, NULL)) {
        fprintf(stderr, "cannot run threads on CPUs %s and %s\n", argv[1], argv[2]);
        return 1;
    }
    double ns[BURSTS];
    for (int k = 0; k < BURSTS; k++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = k * burst; i < (k + 1) * burst; i++) {
            atomic_store_explicit(&ball, 2 * i + 1, memory_order_release);
            while (atomic_load_explicit(&ball, memory_order_acquire) != 2 * i + 2) {}
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ns[k] = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / burst;
    }
    pthread_join(thread, NULL);
    qsort(ns, BURSTS, sizeof ns[0], by_value);
    printf("%.1f\n", ns[BURSTS / 2]);
    return 0;
}
