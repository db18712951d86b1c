#include "raw_enums.h"

void moba_test_set_dtype(moba_tensor* tensor, int value) {
  tensor->dtype = (moba_dtype)value;
}

void moba_test_set_device_type(moba_tensor* tensor, int value) {
  tensor->device_type = (moba_device_type)value;
}

void moba_test_set_backend(moba_options* options, int value) {
  options->backend = (moba_backend)value;
}

int moba_test_backend_available(int value) {
  return moba_backend_available((moba_backend)value);
}

const char* moba_test_status_string(int value) {
  return moba_status_string((moba_status)value);
}
