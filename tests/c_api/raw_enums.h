/* Stores integers that name no enumerator into the enum fields of the C API
 * structs. Done in C, where an enum object may hold any value of its
 * compatible integer type; in C++ the same store would be undefined, since
 * these enums have no fixed underlying type. */
#ifndef MOBA_TESTS_C_API_RAW_ENUMS_H_
#define MOBA_TESTS_C_API_RAW_ENUMS_H_

#include "moba/moba.h"

#ifdef __cplusplus
extern "C" {
#endif

void moba_test_set_dtype(moba_tensor* tensor, int value);
void moba_test_set_device_type(moba_tensor* tensor, int value);
void moba_test_set_backend(moba_options* options, int value);
int moba_test_backend_available(int value);
const char* moba_test_status_string(int value);

#ifdef __cplusplus
}
#endif

#endif /* MOBA_TESTS_C_API_RAW_ENUMS_H_ */
