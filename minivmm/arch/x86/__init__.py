"""The x86 PC machine model: layout, CPUID, MSRs, CPU modes, boot loaders."""
