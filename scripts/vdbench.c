/* In-guest block benchmark for scripts/bench-vhost.sh (built static on the
 * host, run inside the VM). Reads FILE with O_DIRECT, so every read reaches
 * the virtual disk:
 *   vdbench seq FILE            one pass in 1 MiB reads: MiB/s
 *   vdbench rand FILE N         N 4 KiB reads at pseudo-random offsets: p50, p99 (us)
 *   vdbench watch FILE SECONDS  4 KiB reads one after another for SECONDS:
 *                               the longest wait for one read (ms), and how many
 * One line of `key value` pairs on stdout. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vdbench seq|rand|watch FILE [N|SECONDS]\n");
        return 2;
    }
    int fd = open(argv[2], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[2]);
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    off_t size = st.st_size & ~((off_t)(1 << 20) - 1);
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20) != 0 || size == 0) return 1;
    uint64_t x = 88172645463325252ull;
    if (!strcmp(argv[1], "seq")) {
        double t0 = now();
        for (off_t o = 0; o < size; o += 1 << 20)
            if (pread(fd, buf, 1 << 20, o) != 1 << 20) { perror("pread"); return 1; }
        printf("seq_mib_s %.1f\n", size / 1048576.0 / (now() - t0));
    } else if (!strcmp(argv[1], "rand") && argc > 3) {
        int n = atoi(argv[3]);
        double *lat = malloc(sizeof(double) * n);
        for (int i = 0; i < n; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            off_t o = (off_t)(x % (uint64_t)(size / 4096)) * 4096;
            double t0 = now();
            if (pread(fd, buf, 4096, o) != 4096) { perror("pread"); return 1; }
            lat[i] = (now() - t0) * 1e6;
        }
        qsort(lat, n, sizeof(double), cmp);
        printf("p50_us %.1f p99_us %.1f\n", lat[n / 2], lat[n * 99 / 100]);
    } else if (!strcmp(argv[1], "watch") && argc > 3) {
        double end = now() + atof(argv[3]), worst = 0;
        long reads = 0;
        off_t o = 0;
        while (now() < end) {
            double t0 = now();
            if (pread(fd, buf, 4096, o) != 4096) { perror("pread"); return 1; }
            double d = now() - t0;
            if (d > worst) worst = d;
            reads++;
            o = (o + 4096) % size;
        }
        printf("max_wait_ms %.1f reads %ld\n", worst * 1e3, reads);
    } else {
        fprintf(stderr, "usage: vdbench seq|rand|watch FILE [N|SECONDS]\n");
        return 2;
    }
    return 0;
}
