/*
 * Spark reading embfile records on the JVM: the fast read behind embfile.spark.read.
 *
 * Spark's Python data sources hand every row to the JVM through a Python worker and Arrow; reading the
 * records here instead skips both.  The Python driver plans the read (embfile/spark/_jvm.py): it opens the
 * dataset, so every file was checked as embfile.open checks it, and passes each partition's file, its
 * identity and the header fields this reader needs in the option "partitions".  A task reads only inside the
 * sections the driver checked, checks the file is still the one planned (size and header checksum), and checks
 * each key's offsets before it reads the key: a file replaced since planning, or whose key offsets are out of
 * order, is an error naming it (as elsewhere, only `embfile verify` reads the records' checksums).  Of ragged
 * records (per residue), each record's row range is checked the same way before its rows are read.
 *
 * Compiled against the Spark that runs it, at first use (embfile/spark/_jvm.py).
 */
package org.embfile.spark;

import java.io.IOException;
import java.io.Serializable;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Paths;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.spark.sql.catalyst.InternalRow;
import org.apache.spark.sql.catalyst.expressions.GenericInternalRow;
import org.apache.spark.sql.catalyst.expressions.UnsafeArrayData;
import org.apache.spark.sql.catalyst.util.ArrayData;
import org.apache.spark.sql.catalyst.util.GenericArrayData;
import org.apache.spark.sql.connector.catalog.SupportsRead;
import org.apache.spark.sql.connector.catalog.Table;
import org.apache.spark.sql.connector.catalog.TableCapability;
import org.apache.spark.sql.connector.catalog.TableProvider;
import org.apache.spark.sql.connector.expressions.Transform;
import org.apache.spark.sql.connector.read.Batch;
import org.apache.spark.sql.connector.read.InputPartition;
import org.apache.spark.sql.connector.read.PartitionReader;
import org.apache.spark.sql.connector.read.PartitionReaderFactory;
import org.apache.spark.sql.connector.read.Scan;
import org.apache.spark.sql.connector.read.ScanBuilder;
import org.apache.spark.sql.types.DataType;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.sql.util.CaseInsensitiveStringMap;
import org.apache.spark.unsafe.Platform;
import org.apache.spark.unsafe.types.UTF8String;

public final class EmbfileReader implements TableProvider {
    /** Bytes of records a task reads at a time. */
    static final int READ_BYTES = 4 << 20;
    static final int MAX_ROWS = 1 << 16;
    /** Stored types whose values Spark's arrays take as they are, when the machine is little-endian too. */
    static final Set<String> WIDTH_KEPT = Set.of("float32", "float64", "int8", "int16", "int32", "int64");
    static final boolean SAME_BYTES = ByteOrder.nativeOrder() == ByteOrder.LITTLE_ENDIAN;

    @Override
    public StructType inferSchema(CaseInsensitiveStringMap options) {
        return schema(options.get("dtype"), options.getBoolean("ragged", false));
    }

    @Override
    public Table getTable(StructType schema, Transform[] partitioning, Map<String, String> properties) {
        return new RecordsTable(properties.get("dtype"), "true".equals(properties.get("ragged")), properties.get("partitions"));
    }

    /** Spark's type of a vector's elements stored as dtype (as embfile.spark.SPARK_TYPES says). */
    static DataType elementType(String dtype) {
        switch (dtype) {
            case "float16": case "bfloat16": case "float32": return DataTypes.FloatType;
            case "float64": return DataTypes.DoubleType;
            case "int8": return DataTypes.ByteType;
            case "int16": case "uint8": return DataTypes.ShortType;
            case "int32": case "uint16": return DataTypes.IntegerType;
            case "int64": case "uint32": return DataTypes.LongType;
            default: throw new IllegalArgumentException("embfile: " + dtype + " vectors have no Spark type");
        }
    }

    /** key, and vector: an array of the element type, or of ragged records an array of those. */
    static StructType schema(String dtype, boolean ragged) {
        DataType vector = DataTypes.createArrayType(elementType(dtype));
        return new StructType()
            .add("key", DataTypes.StringType)  // nullable, as the Python data source's: the same DataFrame
            .add("vector", ragged ? DataTypes.createArrayType(vector) : vector);
    }

    static final class RecordsTable implements Table, SupportsRead, Scan, ScanBuilder, Batch {
        private final String dtype;
        private final boolean ragged;
        private final String partitions;

        RecordsTable(String dtype, boolean ragged, String partitions) {
            this.dtype = dtype;
            this.ragged = ragged;
            this.partitions = partitions;
        }

        @Override public String name() { return "embfile"; }
        @Override public StructType schema() { return EmbfileReader.schema(dtype, ragged); }
        @Override public StructType readSchema() { return schema(); }
        @Override public Set<TableCapability> capabilities() { return Set.of(TableCapability.BATCH_READ); }
        @Override public ScanBuilder newScanBuilder(CaseInsensitiveStringMap options) { return this; }
        @Override public Scan build() { return this; }
        @Override public Batch toBatch() { return this; }

        @Override
        public InputPartition[] planInputPartitions() {
            List<InputPartition> parts = new ArrayList<>();
            for (String line : partitions.split("\n")) {
                if (!line.isEmpty()) parts.add(new Rows(line, dtype));
            }
            return parts.toArray(new InputPartition[0]);
        }

        @Override
        public PartitionReaderFactory createReaderFactory() {
            return (PartitionReaderFactory) part -> new RowReader((Rows) part);
        }
    }

    /** Records [lo, hi) of one file, with what the driver read of its checked header. */
    static final class Rows implements InputPartition, Serializable {
        final String path, dtype;
        final long size, headerCrc, recordsOffset, keysOffset, keysSize, count, lo, hi;
        final long rangesOffset, rows;  // ragged files: where the records' row offsets lie, and the rows; else 0
        final int dim;

        Rows(String line, String dtype) {
            String[] f = line.split(" ");
            this.path = new String(Base64.getDecoder().decode(f[0]), StandardCharsets.UTF_8);
            this.size = Long.parseLong(f[1]);
            this.headerCrc = Long.parseLong(f[2]);
            this.recordsOffset = Long.parseLong(f[3]);
            this.keysOffset = Long.parseLong(f[4]);
            this.keysSize = Long.parseLong(f[5]);
            this.count = Long.parseLong(f[6]);
            this.dim = Integer.parseInt(f[7]);
            this.lo = Long.parseLong(f[8]);
            this.hi = Long.parseLong(f[9]);
            this.rangesOffset = Long.parseLong(f[10]);
            this.rows = Long.parseLong(f[11]);
            this.dtype = dtype;
        }
    }

    static final class RowReader implements PartitionReader<InternalRow> {
        private final Rows part;
        private final FileChannel file;
        private final int itemSize, recordBytes;
        private final long keyBytesStart, keyBytesEnd;  // where the keys' bytes lie in the file
        private byte[] records, keys;  // of the records read last, [chunkLo, chunkHi): keys from byte keysFirst
        private ByteBuffer offsets, ranges;  // ranges: ragged files, each record's first row (rows from rowsFirst)
        private long row, chunkLo, chunkHi, keysFirst, rowsFirst;
        private InternalRow current;

        RowReader(Rows part) {
            this.part = part;
            this.itemSize = itemSize(part.dtype);
            this.recordBytes = part.dim * itemSize;
            this.keyBytesStart = part.keysOffset + 8 * (part.count + 1);
            this.keyBytesEnd = part.keysOffset + part.keysSize;
            this.row = this.chunkLo = this.chunkHi = part.lo;
            try {
                this.file = FileChannel.open(Paths.get(part.path), StandardOpenOption.READ);
            } catch (IOException e) {
                throw new UncheckedIOException("embfile: " + part.path + ": " + e.getMessage(), e);
            }
            try {
                long crc = read(0, 256).getInt(252) & 0xffffffffL;
                if (file.size() != part.size || crc != part.headerCrc) {
                    throw problem("changed since the read was planned (size or header differ)");
                }
            } catch (IOException | RuntimeException e) {
                try { file.close(); } catch (IOException ignored) { }  // Spark closes only the readers it got
                throw e instanceof IOException ? new UncheckedIOException("embfile: " + part.path + ": " + e.getMessage(), (IOException) e) : (RuntimeException) e;
            }
        }

        static int itemSize(String dtype) {
            switch (dtype) {
                case "int8": case "uint8": return 1;
                case "float16": case "bfloat16": case "int16": case "uint16": return 2;
                case "float32": case "int32": case "uint32": return 4;
                default: return 8;
            }
        }

        private IllegalStateException problem(String what) {
            return new IllegalStateException("embfile: " + part.path + ": " + what);
        }

        private ByteBuffer read(long offset, int length) throws IOException {
            ByteBuffer buf = ByteBuffer.allocate(length).order(ByteOrder.LITTLE_ENDIAN);
            while (buf.hasRemaining()) {
                if (file.read(buf, offset + buf.position()) < 0) throw problem("truncated since it was planned");
            }
            return buf.flip();
        }

        @Override
        public boolean next() throws IOException {
            if (row >= part.hi) return false;
            if (row >= chunkHi) readChunk();
            int i = (int) (row - chunkLo);
            long start = offsets.getLong(8 * i), end = offsets.getLong(8 * i + 8);
            if (start < keysFirst || start > end || end > keysFirst + keys.length) {
                throw problem("the offsets of key " + row + " are out of order");
            }
            UTF8String key = UTF8String.fromBytes(keys, (int) (start - keysFirst), (int) (end - start));
            current = new GenericInternalRow(new Object[] {key, part.rangesOffset == 0 ? vector(i) : record(i)});
            row++;
            return true;
        }

        /** The records, key offsets and key bytes of the records from this one on. */
        private void readChunk() throws IOException {
            chunkLo = row;
            int budget = Math.min(MAX_ROWS, Math.max(1, READ_BYTES / recordBytes));  // rows
            int rows;
            if (part.rangesOffset == 0) {
                chunkHi = Math.min(part.hi, row + budget);
                rows = (int) (chunkHi - chunkLo);
                records = read(part.recordsOffset + chunkLo * recordBytes, rows * recordBytes).array();
            } else {
                rows = readRanges(budget);
            }
            offsets = read(part.keysOffset + 8 * chunkLo, 8 * (rows + 1));
            keysFirst = offsets.getLong(0);
            long last = offsets.getLong(8 * rows);
            if (keysFirst < 0 || keysFirst > last || keyBytesStart + last > keyBytesEnd || last - keysFirst > Integer.MAX_VALUE) {
                throw problem("the offsets of keys " + chunkLo + " to " + chunkHi + " are out of order");
            }
            keys = new byte[(int) (last - keysFirst)];
            read(keyBytesStart + keysFirst, keys.length).get(keys);
        }

        /**
         * Of a ragged file: the row offsets of the records from this one on, as many as come to about budget
         * rows (at least one record), each range checked to rise within the file's rows; then their rows.
         * Returns the number of records.
         */
        private int readRanges(int budget) throws IOException {
            int n = (int) Math.min(part.hi - chunkLo, MAX_ROWS);
            ranges = read(part.rangesOffset + 8 * chunkLo, 8 * (n + 1));
            rowsFirst = ranges.getLong(0);
            int k = 0;
            for (long last = rowsFirst; k < n; k++) {
                long end = ranges.getLong(8 * k + 8);
                if (last < 0 || end <= last || end > part.rows) {
                    throw problem("the rows of record " + (chunkLo + k) + " are out of order");
                }
                if (k > 0 && end - rowsFirst > budget) break;
                last = end;
            }
            long rows = ranges.getLong(8 * k) - rowsFirst;
            if (rows * recordBytes > Integer.MAX_VALUE) throw problem("record " + chunkLo + " is longer than a Spark array holds");
            records = read(part.recordsOffset + rowsFirst * recordBytes, (int) (rows * recordBytes)).array();
            chunkHi = chunkLo + k;
            return k;
        }

        /** Ragged record i of the chunk: Spark's array of its rows, each an array of the element type. */
        private ArrayData record(int i) {
            int first = (int) (ranges.getLong(8 * i) - rowsFirst), end = (int) (ranges.getLong(8 * i + 8) - rowsFirst);
            Object[] rows = new Object[end - first];
            for (int j = 0; j < rows.length; j++) rows[j] = vector(first + j);
            return new GenericArrayData(rows);
        }

        /** Row i of the chunk's records as Spark's array of the element type (elementType says which). */
        private UnsafeArrayData vector(int i) {
            int d = part.dim, at = i * recordBytes;
            if (SAME_BYTES && WIDTH_KEPT.contains(part.dtype)) {  // Spark's arrays hold native-order values
                return UnsafeArrayData.fromPrimitiveArray(records, Platform.BYTE_ARRAY_OFFSET + at, d, itemSize);
            }
            ByteBuffer r = ByteBuffer.wrap(records, at, recordBytes).order(ByteOrder.LITTLE_ENDIAN);
            switch (part.dtype) {
                case "float16": { float[] v = new float[d]; for (int j = 0; j < d; j++) v[j] = halfToFloat(r.getShort()); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "bfloat16": { float[] v = new float[d]; for (int j = 0; j < d; j++) v[j] = Float.intBitsToFloat((r.getShort() & 0xffff) << 16); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "float32": { float[] v = new float[d]; r.asFloatBuffer().get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "float64": { double[] v = new double[d]; r.asDoubleBuffer().get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "int8": { byte[] v = new byte[d]; r.get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "uint8": { short[] v = new short[d]; for (int j = 0; j < d; j++) v[j] = (short) (r.get() & 0xff); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "int16": { short[] v = new short[d]; r.asShortBuffer().get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "uint16": { int[] v = new int[d]; for (int j = 0; j < d; j++) v[j] = r.getShort() & 0xffff; return UnsafeArrayData.fromPrimitiveArray(v); }
                case "int32": { int[] v = new int[d]; r.asIntBuffer().get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                case "uint32": { long[] v = new long[d]; for (int j = 0; j < d; j++) v[j] = r.getInt() & 0xffffffffL; return UnsafeArrayData.fromPrimitiveArray(v); }
                case "int64": { long[] v = new long[d]; r.asLongBuffer().get(v); return UnsafeArrayData.fromPrimitiveArray(v); }
                default: throw problem(part.dtype + " vectors have no Spark type");
            }
        }

        /** IEEE half to float, exactly (Float.float16ToFloat arrived in Java 20). */
        static float halfToFloat(short bits) {
            int h = bits & 0xffff, sign = (h & 0x8000) << 16, exp = (h >>> 10) & 0x1f, mant = h & 0x3ff;
            if (exp == 0x1f) return Float.intBitsToFloat(sign | 0x7f800000 | (mant << 13));  // inf, NaN
            if (exp == 0) {  // zero and subnormals: mant * 2^-24
                float f = mant * 0x1p-24f;
                return sign != 0 ? -f : f;
            }
            return Float.intBitsToFloat(sign | ((exp + 112) << 23) | (mant << 13));
        }

        @Override public InternalRow get() { return current; }
        @Override public void close() throws IOException { file.close(); }
    }
}
