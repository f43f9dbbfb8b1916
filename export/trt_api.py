"""The TensorRT Python API that kdcompress uses, checked against the supported majors (10.x, 11.x).

No TensorRT is imported here. ``tests/unit/test_trt_qdq.py`` walks the AST of
``export/tensorrt.py`` and ``export/runners.py`` and asserts that every ``trt.<name>`` they touch,
and every method/property they call on a TensorRT object, is a key of :data:`TRT_API`, and that
nothing in :data:`REMOVED_IN_11` appears. Each value says where the name was confirmed: the
pybind11 binding sources of github.com/NVIDIA/TensorRT (``python/src/infer/pyCore.cpp``,
``pyFoundationalTypes.cpp``, ``pyGraph.cpp``, ``python/src/parsers/pyOnnx.cpp``) at tags
``v10.0.0`` (the oldest supported release) and ``v11.1`` (the newest stored), plus the
10.x -> 11.x migration guide. Adding a TensorRT call means adding its name here, after checking
it exists in *both* majors (or guarding it with ``hasattr`` and saying so).
"""

from __future__ import annotations

#: Majors the code is written for; ``pyproject.toml``'s ``tensorrt`` extra pins the same range.
SUPPORTED_MAJORS: tuple[int, ...] = (10, 11)
SUPPORTED_SPEC = "tensorrt>=10.0,<12"

_SRC = "NVIDIA/TensorRT python/src/{file} @ v10.0.0 and v11.1"
_CORE = _SRC.format(file="infer/pyCore.cpp")
_TYPES = _SRC.format(file="infer/pyFoundationalTypes.cpp")
_GRAPH = _SRC.format(file="infer/pyGraph.cpp")
_ONNX = _SRC.format(file="parsers/pyOnnx.cpp")
_MIGRATION = "https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html"

#: name -> where it was confirmed. Keys are ``tensorrt`` module attributes (``Builder``,
#: ``BuilderFlag.VERSION_COMPATIBLE``) or ``Class.member`` for methods/properties of objects
#: TensorRT returns (``IBuilderConfig.set_timing_cache``).
TRT_API: dict[str, str] = {
    # ---- module attributes ------------------------------------------------------------------
    "__version__": "NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/__init__.py (__version__) @ v10.0.0 and v11.1",
    "Logger": f"{_CORE}: py::class_<DefaultLogger, ILogger>(m, \"Logger\")",
    "Logger.VERBOSE": f"{_CORE}: ILogger::Severity .value(\"VERBOSE\") .export_values() into ILogger (Logger subclasses it)",
    "Logger.WARNING": f"{_CORE}: ILogger::Severity .value(\"WARNING\") .export_values()",
    "Builder": f"{_CORE}: py::class_<IBuilder>(m, \"Builder\")",
    "Runtime": f"{_CORE}: py::class_<IRuntime>(m, \"Runtime\")",
    "OnnxParser": f"{_ONNX}: py::class_<IParser>(m, \"OnnxParser\")",
    "MemoryPoolType.WORKSPACE": f"{_CORE}: py::enum_<MemoryPoolType> .value(\"WORKSPACE\")",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": (
        f"{_CORE}: py::enum_<NetworkDefinitionCreationFlag> .value(\"STRONGLY_TYPED\"); required for explicit "
        f"precision on 10.x, accepted and ignored on 11.x (\"Deprecated: always enabled\" comment at v11.1)"),
    "BuilderFlag.VERSION_COMPATIBLE": f"{_CORE}: py::enum_<BuilderFlag> .value(\"VERSION_COMPATIBLE\") (read only, never set)",
    "TensorIOMode.INPUT": f"{_CORE}: py::enum_<TensorIOMode> .value(\"INPUT\")",
    "TensorIOMode.OUTPUT": f"{_CORE}: py::enum_<TensorIOMode> .value(\"OUTPUT\")",
    # DataType shorthands: m.attr("float32") = DataType::kFLOAT ... (v10.0.0 and v11.1)
    "float32": f"{_TYPES}: m.attr(\"float32\")",
    "float16": f"{_TYPES}: m.attr(\"float16\")",
    "bfloat16": f"{_TYPES}: m.attr(\"bfloat16\") (there is no trt.bf16)",
    "int8": f"{_TYPES}: m.attr(\"int8\")",
    "int32": f"{_TYPES}: m.attr(\"int32\")",
    "int64": f"{_TYPES}: m.attr(\"int64\")",
    "bool": f"{_TYPES}: m.attr(\"bool\")",
    "uint8": f"{_TYPES}: m.attr(\"uint8\")",
    "fp8": f"{_TYPES}: m.attr(\"fp8\")",
    # ---- Builder / network / parser ---------------------------------------------------------
    "Builder.create_network": f"{_CORE}: .def(\"create_network\", &IBuilder::createNetworkV2, \"flags\"_a = 0U)",
    "Builder.create_builder_config": f"{_CORE}: .def(\"create_builder_config\")",
    "Builder.create_optimization_profile": f"{_CORE}: .def(\"create_optimization_profile\")",
    "Builder.build_serialized_network": f"{_CORE}: .def(\"build_serialized_network\") -> IHostMemory or None",
    "INetworkDefinition.num_inputs": f"{_GRAPH}: .def_property_readonly(\"num_inputs\", &INetworkDefinition::getNbInputs)",
    "INetworkDefinition.get_input": f"{_GRAPH}: .def(\"get_input\", &INetworkDefinition::getInput)",
    "ITensor.name": f"{_GRAPH}: ITensor .def_property(\"name\")",
    "ITensor.shape": f"{_GRAPH}: ITensor .def_property(\"shape\")",
    "OnnxParser.parse_from_file": f"{_ONNX}: .def(\"parse_from_file\", lambdas::parseFromFile, \"model\"_a)",
    "OnnxParser.num_errors": f"{_ONNX}: .def_property_readonly(\"num_errors\")",
    "OnnxParser.get_error": f"{_ONNX}: .def(\"get_error\")",
    "IOptimizationProfile.set_shape": f"{_CORE}: .def(\"set_shape\", \"input\"_a, \"min\"_a, \"opt\"_a, \"max\"_a)",
    # ---- builder config ---------------------------------------------------------------------
    "IBuilderConfig.set_memory_pool_limit": f"{_CORE}: .def(\"set_memory_pool_limit\")",
    "IBuilderConfig.add_optimization_profile": f"{_CORE}: .def(\"add_optimization_profile\")",
    "IBuilderConfig.create_timing_cache": f"{_CORE}: .def(\"create_timing_cache\", \"serialized_timing_cache\"_a)",
    "IBuilderConfig.set_timing_cache": f"{_CORE}: .def(\"set_timing_cache\", \"cache\"_a, \"ignore_mismatch\"_a) -> bool",
    "IBuilderConfig.get_timing_cache": f"{_CORE}: .def(\"get_timing_cache\")",
    "IBuilderConfig.get_flag": f"{_CORE}: .def(\"get_flag\", &IBuilderConfig::getFlag)",
    "IBuilderConfig.hardware_compatibility_level": f"{_CORE}: IBuilderConfig .def_property(\"hardware_compatibility_level\")",
    "ITimingCache.serialize": f"{_CORE}: .def(\"serialize\", &ITimingCache::serialize)",
    # ---- runtime / engine / context ---------------------------------------------------------
    "Runtime.deserialize_cuda_engine": f"{_CORE}: .def(\"deserialize_cuda_engine\", \"serialized_engine\"_a) -> ICudaEngine or None",
    "Runtime.engine_host_code_allowed": f"{_CORE}: .def_property(\"engine_host_code_allowed\") (set only for version-compatible plans)",
    "ICudaEngine.num_io_tensors": f"{_CORE}: .def_property_readonly(\"num_io_tensors\")",
    "ICudaEngine.get_tensor_name": f"{_CORE}: .def(\"get_tensor_name\")",
    "ICudaEngine.get_tensor_mode": f"{_CORE}: .def(\"get_tensor_mode\")",
    "ICudaEngine.get_tensor_dtype": f"{_CORE}: .def(\"get_tensor_dtype\")",
    "ICudaEngine.get_tensor_profile_shape": f"{_CORE}: .def(\"get_tensor_profile_shape\", \"name\"_a, \"profile_index\"_a)",
    "ICudaEngine.create_execution_context": f"{_CORE}: .def(\"create_execution_context\")",
    "ICudaEngine.device_memory_size_v2": (
        "NVIDIA/TensorRT python/src/infer/pyCore.cpp @ v10.1.0, v10.16 and v11.1 (absent at v10.0.0/v10.0.1): "
        "guarded with hasattr, falls back to device_memory_size"),
    "ICudaEngine.device_memory_size": (
        "NVIDIA/TensorRT python/src/infer/pyCore.cpp @ v10.0.0 (removed in 11.x, " + _MIGRATION + "): "
        "only reached on 10.x releases without device_memory_size_v2"),
    "IExecutionContext.set_input_shape": f"{_CORE}: .def(\"set_input_shape\", \"name\"_a, \"shape\"_a) -> bool",
    "IExecutionContext.get_tensor_shape": f"{_CORE}: IExecutionContext .def(\"get_tensor_shape\") (-1 = data-dependent)",
    "IExecutionContext.set_tensor_address": f"{_CORE}: .def(\"set_tensor_address\")",
    "IExecutionContext.execute_async_v3": f"{_CORE}: .def(\"execute_async_v3\", \"stream_handle\"_a) -> bool",
}

#: Removed in TensorRT 11 (``_MIGRATION``); must not appear in export/tensorrt.py or export/runners.py.
REMOVED_IN_11: dict[str, str] = {
    "BuilderFlag.FP16": _MIGRATION + " (strong typing: convert the ONNX to mixed precision)",
    "BuilderFlag.INT8": _MIGRATION + " (explicit quantization with Q/DQ nodes)",
    "BuilderFlag.BF16": _MIGRATION,
    "BuilderFlag.FP8": _MIGRATION,
    "BuilderFlag.OBEY_PRECISION_CONSTRAINTS": _MIGRATION,
    "BuilderFlag.PREFER_PRECISION_CONSTRAINTS": _MIGRATION,
    "IInt8EntropyCalibrator2": "pyInt8.cpp exists at v10.0.0, gone at v11.1; " + _MIGRATION,
    "IInt8Calibrator": "pyInt8.cpp exists at v10.0.0, gone at v11.1",
    "int8_calibrator": _MIGRATION + " (IBuilderConfig.int8_calibrator)",
    "set_calibration_profile": _MIGRATION + " (IBuilderConfig.set_calibration_profile)",
    "platform_has_fast_fp16": _MIGRATION + " (Builder.platform_has_fast_fp16; absent from pyCore.cpp at v11.1)",
    "platform_has_fast_int8": _MIGRATION + " (Builder.platform_has_fast_int8)",
    "bf16": "never a tensorrt attribute: the DataType shorthand is trt.bfloat16 (pyFoundationalTypes.cpp)",
}

#: Variable names in export/tensorrt.py and export/runners.py bound to TensorRT objects, and their
#: class (what the AST test uses to resolve ``config.set_timing_cache`` -> ``IBuilderConfig.set_timing_cache``).
TRT_OBJECTS: dict[str, str] = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "inp": "ITensor",
    "profile": "IOptimizationProfile",
    "config": "IBuilderConfig",
    "tcache": "ITimingCache",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "self.engine": "ICudaEngine",
    "context": "IExecutionContext",
    "self.context": "IExecutionContext",
}
