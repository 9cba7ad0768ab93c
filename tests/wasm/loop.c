/* Spins forever without yielding. */
#include <stdio.h>

int main(void) {
    volatile unsigned long counter = 0;
    printf("looping\n");
    fflush(stdout);
    for (;;)
        counter++;
}
