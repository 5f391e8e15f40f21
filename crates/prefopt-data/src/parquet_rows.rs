//! Parquet files as JSON rows: each row becomes a JSON object, column by column, so
//! Parquet and JSON Lines datasets go through the same parsing code.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::error::DataError;

/// Every row of a Parquet file as a JSON object, in file order.
pub(crate) fn read_parquet_rows(path: &Path) -> Result<Vec<Map<String, Value>>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| DataError::file(path, format!("cannot read Parquet: {e}")))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| DataError::file(path, format!("cannot read Parquet: {e}")))?;
        batch_rows(&batch, &mut rows).map_err(|e| DataError::file(path, e))?;
    }
    Ok(rows)
}

fn batch_rows(batch: &RecordBatch, rows: &mut Vec<Map<String, Value>>) -> Result<(), String> {
    let schema = batch.schema();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        columns.push((field.name().clone(), column_to_json(array.as_ref(), field.name())?));
    }
    for i in 0..batch.num_rows() {
        let mut row = Map::new();
        for (name, values) in &columns {
            row.insert(name.clone(), values.get(i).cloned().unwrap_or(Value::Null));
        }
        rows.push(row);
    }
    Ok(())
}

fn unsupported(name: &str, dt: &DataType) -> String {
    format!("column `{name}` has Arrow type {dt}, which prefopt cannot read as JSON")
}

fn number(name: &str, x: f64) -> Result<Value, String> {
    serde_json::Number::from_f64(x)
        .map(Value::Number)
        .ok_or_else(|| format!("column `{name}` holds {x}, which JSON cannot represent"))
}

macro_rules! ints {
    ($array:expr, $name:expr, $t:ty) => {{
        let a = $array.as_primitive_opt::<$t>().ok_or_else(|| unsupported($name, $array.data_type()))?;
        a.iter().map(|v| v.map_or(Value::Null, Value::from)).collect()
    }};
}

macro_rules! floats {
    ($array:expr, $name:expr, $t:ty) => {{
        let a = $array.as_primitive_opt::<$t>().ok_or_else(|| unsupported($name, $array.data_type()))?;
        a.iter()
            .map(|v| match v {
                None => Ok(Value::Null),
                Some(x) => number($name, f64::from(x)),
            })
            .collect::<Result<Vec<_>, String>>()?
    }};
}

/// Child values `[start, end)` of a list row, or an error if the offsets are out of range.
fn slice(child: &[Value], start: usize, end: usize, name: &str) -> Result<Value, String> {
    child
        .get(start..end)
        .map(|s| Value::Array(s.to_vec()))
        .ok_or_else(|| format!("column `{name}`: list offsets out of range"))
}

/// One JSON value per element of `array` (nulls become `null`).
fn column_to_json(array: &dyn Array, name: &str) -> Result<Vec<Value>, String> {
    let dt = array.data_type();
    let mut values: Vec<Value> = match dt {
        DataType::Null => vec![Value::Null; array.len()],
        DataType::Boolean => {
            let a = array.as_boolean_opt().ok_or_else(|| unsupported(name, dt))?;
            a.iter().map(|v| v.map_or(Value::Null, Value::Bool)).collect()
        }
        DataType::Int8 => ints!(array, name, Int8Type),
        DataType::Int16 => ints!(array, name, Int16Type),
        DataType::Int32 => ints!(array, name, Int32Type),
        DataType::Int64 => ints!(array, name, Int64Type),
        DataType::UInt8 => ints!(array, name, UInt8Type),
        DataType::UInt16 => ints!(array, name, UInt16Type),
        DataType::UInt32 => ints!(array, name, UInt32Type),
        DataType::UInt64 => ints!(array, name, UInt64Type),
        DataType::Float32 => floats!(array, name, Float32Type),
        DataType::Float64 => floats!(array, name, Float64Type),
        DataType::Utf8 => {
            let a = array.as_string_opt::<i32>().ok_or_else(|| unsupported(name, dt))?;
            a.iter().map(|v| v.map_or(Value::Null, Value::from)).collect()
        }
        DataType::LargeUtf8 => {
            let a = array.as_string_opt::<i64>().ok_or_else(|| unsupported(name, dt))?;
            a.iter().map(|v| v.map_or(Value::Null, Value::from)).collect()
        }
        DataType::Utf8View => {
            let a = array.as_string_view_opt().ok_or_else(|| unsupported(name, dt))?;
            a.iter().map(|v| v.map_or(Value::Null, Value::from)).collect()
        }
        DataType::List(_) => {
            let a = array.as_list_opt::<i32>().ok_or_else(|| unsupported(name, dt))?;
            let child = column_to_json(a.values().as_ref(), name)?;
            let offsets = a.value_offsets();
            (0..a.len())
                .map(|i| {
                    let (s, e) = (offsets[i], offsets[i + 1]);
                    slice(&child, s as usize, e as usize, name)
                })
                .collect::<Result<_, _>>()?
        }
        DataType::LargeList(_) => {
            let a = array.as_list_opt::<i64>().ok_or_else(|| unsupported(name, dt))?;
            let child = column_to_json(a.values().as_ref(), name)?;
            let offsets = a.value_offsets();
            (0..a.len())
                .map(|i| {
                    let (s, e) = (offsets[i], offsets[i + 1]);
                    slice(&child, s as usize, e as usize, name)
                })
                .collect::<Result<_, _>>()?
        }
        DataType::FixedSizeList(_, n) => {
            let a = array.as_fixed_size_list_opt().ok_or_else(|| unsupported(name, dt))?;
            let child = column_to_json(a.values().as_ref(), name)?;
            let n = *n as usize;
            (0..a.len())
                .map(|i| {
                    let s = a.value_offset(i) as usize;
                    slice(&child, s, s + n, name)
                })
                .collect::<Result<_, _>>()?
        }
        DataType::Struct(fields) => {
            let a = array.as_struct_opt().ok_or_else(|| unsupported(name, dt))?;
            let mut children = Vec::with_capacity(fields.len());
            for (field, column) in fields.iter().zip(a.columns()) {
                let child_name = format!("{name}.{}", field.name());
                children.push((field.name().clone(), column_to_json(column.as_ref(), &child_name)?));
            }
            (0..a.len())
                .map(|i| {
                    let mut obj = Map::new();
                    for (field, values) in &children {
                        obj.insert(field.clone(), values.get(i).cloned().unwrap_or(Value::Null));
                    }
                    Value::Object(obj)
                })
                .collect()
        }
        DataType::Dictionary(_, _) => {
            let a = array.as_any_dictionary_opt().ok_or_else(|| unsupported(name, dt))?;
            let dict = column_to_json(a.values().as_ref(), name)?;
            a.normalized_keys().into_iter().map(|k| dict.get(k).cloned().unwrap_or(Value::Null)).collect()
        }
        _ => return Err(unsupported(name, dt)),
    };
    // Nulls at this level (a null list, a null struct) override what the children hold.
    if array.null_count() > 0 {
        for (i, v) in values.iter_mut().enumerate() {
            if array.is_null(i) {
                *v = Value::Null;
            }
        }
    }
    Ok(values)
}
