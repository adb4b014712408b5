// Compiles the generated header as C++17 (-Wall -Wextra -Werror) and links a call.
#include "webpubsub_client.h"

#include <cstdio>

int main() {
    wps_options *o = wps_options_new();
    wps_status s = wps_options_set_protocol(o, WPS_PROTOCOL_JSON);
    wps_options_free(o);
    std::printf("header ok: %s %s\n", WPS_VERSION, wps_status_str(s));
    return s == WPS_STATUS_OK ? 0 : 1;
}
