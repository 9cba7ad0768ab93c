/* Allocates and touches memory, one MiB at a time, until something stops it. The chunks
 * are chained and written through a volatile pointer, so the compiler keeps every one. */
#include <stdio.h>
#include <stdlib.h>

static void *volatile head;

int main(void) {
    printf("allocating\n");
    fflush(stdout);
    for (unsigned long mib = 1;; mib++) {
        volatile char *chunk = malloc(1 << 20);
        if (!chunk) {
            printf("allocation failed after %lu MiB\n", mib - 1);
            return 1;
        }
        for (unsigned long offset = 0; offset < (1 << 20); offset += 4096)
            chunk[offset] = (char)mib;
        *(void *volatile *)chunk = head;
        head = (void *)chunk;
        if (mib % 16 == 0) {
            printf("allocated %lu MiB\n", mib);
            fflush(stdout);
        }
    }
}
