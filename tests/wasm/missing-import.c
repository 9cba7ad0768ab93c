/* Calls a function the host does not provide. */
__attribute__((import_module("env"), import_name("kuasar_missing"))) extern int kuasar_missing(void);

int main(void) {
    return kuasar_missing();
}
