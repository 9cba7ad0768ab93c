/* Writes its second argument into the file named by its first. */
#include <stdio.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: writer PATH TEXT\n");
        return 2;
    }
    FILE *file = fopen(argv[1], "w");
    if (!file) {
        perror(argv[1]);
        return 1;
    }
    fprintf(file, "%s\n", argv[2]);
    fclose(file);
    printf("wrote %s\n", argv[1]);
    return 0;
}
