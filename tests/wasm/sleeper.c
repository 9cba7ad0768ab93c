/* Sleeps for an hour. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("sleeping\n");
    fflush(stdout);
    sleep(3600);
    return 0;
}
