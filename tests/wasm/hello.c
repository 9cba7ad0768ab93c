/* Prints a greeting, its arguments, GREETING from the environment and its working
 * directory to stdout, and one line to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char cwd[256];
    printf("hello from wasm\n");
    for (int i = 0; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);
    const char *greeting = getenv("GREETING");
    if (greeting)
        printf("GREETING=%s\n", greeting);
    if (getcwd(cwd, sizeof cwd))
        printf("cwd=%s\n", cwd);
    fprintf(stderr, "hello on stderr\n");
    return 0;
}
