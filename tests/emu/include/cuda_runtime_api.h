// Stands in for the toolkit header of this name on the host emulator: see emu_cuda.h.
#pragma once
#include "../simt.h"
